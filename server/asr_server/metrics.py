"""Prometheus metrics of the server: pure prometheus_client, no gRPC (the edge feeds it through `RpcOutcome`).

Series (py-grpc-prometheus names for the gRPC ones, so existing dashboards work):

- `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`, `grpc_server_handling_seconds` (histogram),
  `grpc_server_msg_received_total`, `grpc_server_msg_sent_total`; labels `grpc_service`, `grpc_method`,
  `grpc_type` (unary, client_stream, server_stream, bidi_stream);
- `asr_audio_seconds_total{grpc_method}`: audio seconds processed: of calls that ended OK, and of live streams
  however they ended;
- `asr_refused_total{grpc_method, grpc_code, reason}`: calls refused for capacity (RESOURCE_EXHAUSTED with retry
  advice: queue full, live-stream cap), a limit (RESOURCE_EXHAUSTED without: audio too long) or unavailability
  (UNAVAILABLE: starting, draining, aligner down);
- `asr_live_streams`, `asr_engine_waiting_requests{replica}`, `asr_engine_running_requests{replica}`,
  `asr_engine_in_flight_requests{replica}`: gauges read when scraped (a collector callback), never polled;
- engine cores' own figures, where the core reports them (engine/core.py CoreStats; in-process read at scrape time,
  from an engine process the last stats it pushed, at most ~1 s old): `asr_engine_batch_size{replica}` (histogram of
  rows per decode step, continuous, or per batch, generate and fake), `asr_engine_generated_tokens_total{replica}`
  (rate() of it is tokens per second), `asr_engine_kv_pages_used{replica}` / `asr_engine_kv_pages_total{replica}`
  (continuous core's KV cache); counters start over when an engine process is restarted (Prometheus reads a drop as
  a reset);
- `asr_aligner_in_flight_requests` (alignments sent to the sidecar and not answered: its queue plus its batch) and
  `asr_aligner_restarts_total` (sidecar restarts, spawn mode), with an aligner configured;
- the HTTP front (--http-port): `asr_http_requests_total{route, status_code}` and `asr_http_request_duration_seconds
  {route}` (histogram); its audio counts in `asr_audio_seconds_total` and its refusals in `asr_refused_total` with
  `grpc_method` set to the route (e.g. "/v1/audio/transcriptions") and `grpc_code` to the HTTP status code;
- `asr_stream_final_delay_seconds` (histogram): per live stream, its worst delay of a final after its utterance
  ended; `asr_stream_lagging_finals_total`: finals later than --max-stream-lag-ms (the ones also logged);
  `asr_stream_speculative_finals_total{outcome}`: speculative finals kept or discarded.

Each `ServerMetrics` has its own registry, so several servers in one process (tests) do not collide, and the
process's default registry (which prometheus_client fills at import) is not served.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from asr_server.engine.core import BATCH_SIZE_BUCKETS, CoreStats

# Seconds: from a 5 ms GetServerInfo to an hour-long live stream.
_HANDLING_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
# Seconds a final may come after its utterance ended: the endpoint wait is included, so under 1 s is normal.
_FINAL_DELAY_BUCKETS_S = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class RpcOutcome:
    """One finished call, as the edge saw it (the access log reads the same record)."""

    service: str
    method: str
    rpc_type: str  # unary, client_stream, server_stream, bidi_stream
    code: str  # the gRPC status name: OK, INVALID_ARGUMENT, ...
    duration_s: float
    audio_s: float
    messages_received: int
    messages_sent: int
    request_bytes: int
    peer: str
    request_id: str
    # The status message of a failed call ("" for OK).
    message: str = ""
    # Why a refused call was refused ("capacity", "limit", "unavailable"); "" when it was not refused.
    refused: str = ""


@dataclass(frozen=True)
class HttpOutcome:
    """One finished request of the HTTP front (the access log reads the same record)."""

    method: str
    route: str
    status_code: int
    duration_s: float
    audio_s: float
    request_bytes: int
    peer: str
    request_id: str
    message: str = ""  # the error message of a failed request
    refused: str = ""  # as RpcOutcome.refused


@dataclass(frozen=True)
class ReplicaLoad:
    """One engine replica's load at the moment of a scrape."""

    replica: str
    # For an engine core in its own process (--engine-process), as of the stats it last pushed; None until its
    # first push.
    waiting: int | None
    running: int | None
    in_flight: int
    # The core's own counters and KV pages; None where the core reports none (or an engine process has not yet).
    core: CoreStats | None = None


@dataclass(frozen=True)
class AlignerLoad:
    in_flight: int
    restarts: int


class _LiveCollector(Collector):
    """Gauges computed at scrape time from the running server's state."""

    def __init__(
        self,
        live_streams: Callable[[], int],
        engine_load: Callable[[], list[ReplicaLoad]],
        aligner_load: Callable[[], AlignerLoad | None],
    ) -> None:
        self._live_streams = live_streams
        self._engine_load = engine_load
        self._aligner_load = aligner_load

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("asr_live_streams", "StreamingRecognize calls open", value=self._live_streams())
        waiting = GaugeMetricFamily(
            "asr_engine_waiting_requests", "pieces of audio queued in the engine, not yet decoding", labels=["replica"]
        )
        running = GaugeMetricFamily("asr_engine_running_requests", "pieces of audio decoding", labels=["replica"])
        in_flight = GaugeMetricFamily(
            "asr_engine_in_flight_requests",
            "pieces of audio submitted and not yet answered (the queue bound --max-queued-requests counts these)",
            labels=["replica"],
        )
        batch_size = HistogramMetricFamily(
            "asr_engine_batch_size",
            "rows per decode step (continuous engine) or per batch (generate, fake)",
            labels=["replica"],
        )
        tokens = CounterMetricFamily(
            "asr_engine_generated_tokens", "tokens the engine generated (rate: tokens per second)", labels=["replica"]
        )
        kv_used = GaugeMetricFamily("asr_engine_kv_pages_used", "KV cache pages held by requests", labels=["replica"])
        kv_total = GaugeMetricFamily("asr_engine_kv_pages_total", "KV cache pages usable in all", labels=["replica"])
        for load in self._engine_load():
            if load.waiting is not None:
                waiting.add_metric([load.replica], load.waiting)
            if load.running is not None:
                running.add_metric([load.replica], load.running)
            in_flight.add_metric([load.replica], load.in_flight)
            core = load.core
            if core is None:
                continue
            batch_size.add_metric([load.replica], _cumulative_buckets(core.batch_size_counts), sum_value=core.rows)
            tokens.add_metric([load.replica], core.generated_tokens)
            if core.kv_pages_used is not None and core.kv_pages_total is not None:
                kv_used.add_metric([load.replica], core.kv_pages_used)
                kv_total.add_metric([load.replica], core.kv_pages_total)
        yield from (waiting, running, in_flight, batch_size, tokens, kv_used, kv_total)
        aligner = self._aligner_load()
        if aligner is not None:
            yield GaugeMetricFamily(
                "asr_aligner_in_flight_requests",
                "alignments sent to the aligner sidecar and not yet answered (its queue and its batch)",
                value=aligner.in_flight,
            )
            yield CounterMetricFamily(
                "asr_aligner_restarts", "times the aligner sidecar was restarted", value=aligner.restarts
            )


def _cumulative_buckets(counts: tuple[int, ...]) -> list[tuple[str, float]]:
    """Per-bucket counts (BATCH_SIZE_BUCKETS, then the open one) as Prometheus's cumulative `le` buckets."""
    buckets: list[tuple[str, float]] = []
    total = 0
    # "4.0", not "4": the `le` spelling prometheus_client's own histograms use, so queries match either kind.
    for bound, count in zip((*(str(float(b)) for b in BATCH_SIZE_BUCKETS), "+Inf"), counts, strict=True):
        total += count
        buckets.append((bound, total))
    return buckets


class ServerMetrics:
    def __init__(
        self,
        *,
        live_streams: Callable[[], int] = lambda: 0,
        engine_load: Callable[[], list[ReplicaLoad]] = list,
        aligner_load: Callable[[], AlignerLoad | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        grpc_labels = ["grpc_service", "grpc_method", "grpc_type"]
        self._started = Counter(
            "grpc_server_started_total", "RPCs started on the server", grpc_labels, registry=self.registry
        )
        self._handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code",
            [*grpc_labels, "grpc_code"],
            registry=self.registry,
        )
        self._handling = Histogram(
            "grpc_server_handling_seconds",
            "time from the start of an RPC to its status",
            grpc_labels,
            buckets=_HANDLING_BUCKETS_S,
            registry=self.registry,
        )
        self._received = Counter(
            "grpc_server_msg_received_total", "request messages received", grpc_labels, registry=self.registry
        )
        self._sent = Counter(
            "grpc_server_msg_sent_total", "response messages sent", grpc_labels, registry=self.registry
        )
        self._audio = Counter(
            "asr_audio_seconds_total", "audio seconds processed", ["grpc_method"], registry=self.registry
        )
        self._refused = Counter(
            "asr_refused_total",
            "calls refused: capacity (retry advised), limit (over a configured limit), unavailable",
            ["grpc_method", "grpc_code", "reason"],
            registry=self.registry,
        )
        self._final_delay = Histogram(
            "asr_stream_final_delay_seconds",
            "per live stream: its longest delay of a final after the utterance ended (behind real time)",
            buckets=_FINAL_DELAY_BUCKETS_S,
            registry=self.registry,
        )
        self._lagging = Counter(
            "asr_stream_lagging_finals_total",
            "finals that came later than --max-stream-lag-ms after their utterance ended",
            registry=self.registry,
        )
        self._speculations = Counter(
            "asr_stream_speculative_finals_total",
            "live utterances' finals decoded speculatively at the first trailing silence: kept (ready at the "
            "endpoint) or discarded (speech resumed: wasted work)",
            ["outcome"],
            registry=self.registry,
        )
        self._http_requests = Counter(
            "asr_http_requests_total",
            "HTTP requests of the OpenAI-compatible front, by route and status code",
            ["route", "status_code"],
            registry=self.registry,
        )
        self._http_duration = Histogram(
            "asr_http_request_duration_seconds",
            "time from an HTTP request's arrival to its response",
            ["route"],
            buckets=_HANDLING_BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(live_streams, engine_load, aligner_load))

    def rpc_started(self, service: str, method: str, rpc_type: str) -> None:
        self._started.labels(service, method, rpc_type).inc()

    def rpc_finished(self, outcome: RpcOutcome) -> None:
        labels = (outcome.service, outcome.method, outcome.rpc_type)
        self._handled.labels(*labels, outcome.code).inc()
        self._handling.labels(*labels).observe(outcome.duration_s)
        self._received.labels(*labels).inc(outcome.messages_received)
        self._sent.labels(*labels).inc(outcome.messages_sent)
        # A refused or failed request's audio was not processed; a live stream's was, however the stream ended.
        if outcome.audio_s > 0 and (outcome.code == "OK" or outcome.rpc_type == "bidi_stream"):
            self._audio.labels(outcome.method).inc(outcome.audio_s)
        if outcome.refused:
            self._refused.labels(outcome.method, outcome.code, outcome.refused).inc()

    def http_finished(self, outcome: HttpOutcome) -> None:
        self._http_requests.labels(outcome.route, str(outcome.status_code)).inc()
        self._http_duration.labels(outcome.route).observe(outcome.duration_s)
        if outcome.audio_s > 0 and outcome.status_code < 400:
            self._audio.labels(outcome.route).inc(outcome.audio_s)
        if outcome.refused:
            self._refused.labels(outcome.route, str(outcome.status_code), outcome.refused).inc()

    def stream_ended(self, max_final_delay_s: float) -> None:
        self._final_delay.observe(max_final_delay_s)

    def final_lagged(self) -> None:
        self._lagging.inc()

    def utterance_closed(self, speculations_kept: int, speculations_discarded: int) -> None:
        if speculations_kept:
            self._speculations.labels("kept").inc(speculations_kept)
        if speculations_discarded:
            self._speculations.labels("discarded").inc(speculations_discarded)

    def serve(self, port: int, host: str = "0.0.0.0") -> MetricsEndpoint:
        """Starts prometheus_client's own HTTP server (a daemon thread) on `port`; 0 picks a free port."""
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)

        def close() -> None:
            httpd.shutdown()
            httpd.server_close()
            thread.join(5.0)

        return MetricsEndpoint(port=int(httpd.server_address[1]), close=close)


@dataclass(frozen=True)
class MetricsEndpoint:
    """The running /metrics HTTP server; `close` stops it (it blocks for the server thread: call it off the loop)."""

    port: int
    close: Callable[[], None]
