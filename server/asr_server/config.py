"""The one typed config tree, read in one place: command-line flags, each with an ASR_* environment default.

Precedence: a flag on the command line, else its environment variable, else the default shown in --help.
Nothing else in the server reads os.environ or argv. The aligner sidecar (`asr-server aligner`) has its own small
tree here too, SidecarConfig, whose ASR_ALIGNER_* variables are the ones the server's --aligner-* flags read.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from asr_server import __version__
from asr_server.errors import excerpt
from asr_server.models.devices import parse_device_list

TracingExporter = Literal["none", "console", "otlp"]
EngineKind = Literal["continuous", "transformers", "fake"]
EngineProcessMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class ModelConfig:
    # A hub id ("Qwen/Qwen3-ASR-1.7B-hf", "Qwen/Qwen3-ASR-1.7B") or a local directory, either layout.
    model: str = "Qwen/Qwen3-ASR-1.7B-hf"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda:0 when available, else cpu
    device_map: str | None = None
    attn_implementation: str | None = None


@dataclass(frozen=True)
class ContinuousConfig:
    """The continuous-batching engine (engine/continuous): its part of the config tree, `EngineConfig.continuous`."""

    # Rows of the decode batch: the most requests decoding at once.
    max_running: int = 128
    page_size: int = 64
    # KV cache size: an explicit token count, else (0) this fraction of the device memory left after loading.
    kv_cache_tokens: int = 0
    kv_cache_memory_fraction: float = 0.85
    # Longest prompt + generation one request may have (sets the block table's width).
    max_context_tokens: int = 32768
    max_prefill_tokens: int = 16384
    # While requests are decoding, newcomers are prefilled together once the oldest has waited this long (or
    # enough have arrived to fill half a prefill), not one small prefill per step: each prefill has a fixed cost
    # (encoder and decoder launches, ~10-15 ms) that the running streams pay for on every step it runs.
    prefill_interval_ms: float = 12.0
    encoder_batch_audio_s: float = 960.0
    cuda_graphs: bool = True
    preprocess_threads: int = 8
    # "auto": fused Triton kernels on CUDA, the checkpoint's own torch modules elsewhere; "triton" forces them
    # (with TRITON_INTERPRET=1 on CPU, for tests without a GPU).
    kernels: str = "auto"
    # "auto": the model's dtype; "fp8": float8 e4m3 with no scale (half the KV bytes; changes numerics slightly).
    kv_cache_dtype: str = "auto"
    # Benchmarks: synchronise after each phase and add up its time in ContinuousEngine.profile (slower).
    profile: bool = False
    # Whole-prompt prefills (encoder + decoder) on a thread and a CUDA stream of their own, beside the decode
    # steps, which then never wait for a prefill's host work (tens of ms of kernel launches per prefill; live
    # streams send a prefill every few steps). "auto": on for CUDA with whole prompts and full page reservation;
    # "on" also on the CPU (tests); chunked prefill and lazy pages always prefill in the step.
    async_prefill: Literal["auto", "on", "off"] = "auto"
    # Benchmarks: append a JSON-lines timeline of every request and step here (trace.py); "" = off.
    trace_path: str = ""
    # KV pages per request: "full" reserves the prompt plus the whole token budget at admission (nothing is ever
    # preempted); "lazy" gives pages as the request grows and, when they run out, preempts the most recently
    # admitted request, which is later prefilled again over its prompt and the tokens it had (recompute).
    kv_reservation: Literal["full", "lazy"] = "full"
    # "reference": log-mel by the processor's feature extractor, per request on the preprocess threads; "torch":
    # continuous/features.py, one batched call per step on the engine's device for every clip whose encoder runs
    # in it (the engine gets 16 kHz samples); equal to the extractor within REFERENCE_TOLERANCE (0.0 on the CPU,
    # <= 2.6e-5 on an H200: tests/integration/test_features_torch.py). "auto": torch on CUDA, reference elsewhere
    # (on the CPU both give the same values; the reference keeps the work off the engine thread there).
    features: Literal["auto", "reference", "torch"] = "auto"
    # Chunked prefill: each step's token budget (one per decoding row, the rest prefill chunks of arriving
    # requests, which may span steps); must exceed max_running. 0: off (whole prompts, max_prefill_tokens per
    # step, every prefill_interval_ms).
    max_step_tokens: int = 0
    # Live streams (features="torch" only): the encoder outputs of an open utterance's completed 8 s windows are
    # kept per stream utterance and reused by its next interim or final when provably unchanged (stream_cache.py).
    # Bounds: utterances held (least recently used evicted; 0: off), windows per utterance, device MiB in all, and
    # an entry untouched this long is freed (a stream that ended without a final). With them, the decoder KV of
    # the prompt up to the end of the leading kept windows, so the next request prefills from there
    # (stream_cache_max_kv_mib device MiB in all, outside the KV page pool; 0: no KV kept).
    stream_cache_max_streams: int = 1024
    stream_cache_max_windows: int = 16
    stream_cache_max_mib: float = 2048.0
    stream_cache_max_kv_mib: float = 2048.0
    # A live final's draft (its utterance's last interim's tokens): at most this many are prefilled after its
    # prompt and verified in that one pass (greedy: the longest prefix decoding agrees with is kept, the rest
    # decoded as usual), so the final needs fewer decode steps. 0: off. Whole prompts with full page reservation
    # only (no chunked prefill, no lazy pages).
    max_draft_tokens: int = 64
    stream_cache_idle_s: float = 60.0


@dataclass(frozen=True)
class EngineConfig:
    kind: EngineKind = "continuous"
    max_inference_batch_size: int = 32
    # How long the first request of a batch may wait for others to join it.
    max_batch_wait_ms: float = 5.0
    # Requests waiting for the engine beyond this are refused with RESOURCE_EXHAUSTED.
    max_queued_requests: int = 1024
    default_max_new_tokens: int = 4096
    max_new_tokens_limit: int = 8192
    # Fake engine only: simulated time per batch, to test batching and cancellation.
    fake_batch_delay_ms: float = 0.0
    warmup: bool = True
    # Continuous engine (engine/continuous): decode rows, KV cache, prefill and encoder budgets, CUDA graphs.
    continuous: ContinuousConfig = field(default_factory=ContinuousConfig)
    # One engine replica per device (--devices cuda:0,cuda:1, parsed here once); empty: the single --device.
    devices: tuple[str, ...] = ()
    # Benchmarks only: every request generates exactly this many tokens per audio second (+6 for the language
    # prefix), ignoring EOS, so random-weight models produce realistic lengths. 0: off.
    bench_forced_tokens_per_audio_s: float = 0.0
    # The engine core in its own process per replica (engine/process): "on", "off", or "auto": on for a model on
    # CUDA, off for the fake engine and CPU (in-process there: tests and `make demo` start no extra processes).
    process: EngineProcessMode = "auto"


@dataclass(frozen=True)
class LimitsConfig:
    max_audio_duration_s: int = 4 * 3600
    max_message_bytes: int = 64 * 1024 * 1024
    max_stream_bytes: int = 2 * 1024 * 1024 * 1024
    max_chunk_s: int = 1200
    max_chunk_with_timestamps_s: int = 180
    # Decoded 16 kHz audio all requests in flight may hold, in MiB (a 4 h mono file is 879 MiB): reserved from
    # the header before decoding, refused RESOURCE_EXHAUSTED past it (audio/budget.py). 0: no bound.
    max_decoded_audio_mb: int = 2048


@dataclass(frozen=True)
class AlignerConfig:
    # Empty: no aligner, word timestamps answer FAILED_PRECONDITION.
    model: str = ""
    # "spawn": the server starts and supervises the sidecar; "connect": one runs elsewhere at `address`.
    mode: Literal["spawn", "connect"] = "spawn"
    address: str = ""  # unix:///path or host:port; spawn mode picks a unix socket when empty
    dtype: str = "auto"
    device: str = "auto"
    max_batch_size: int = 32
    max_batch_wait_ms: float = 5.0
    # Deadline of one alignment call to the sidecar, waiting for a restarting sidecar included.
    timeout_s: float = 120.0


@dataclass(frozen=True)
class TracingConfig:
    exporter: TracingExporter = "none"
    otlp_endpoint: str = "http://localhost:4317"
    service_name: str = "qwen-asr-server"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    # On SIGTERM: how long in-flight calls may run on before they are cancelled.
    grace_period_s: float = 30.0
    # When set, every call must carry "authorization: Bearer <token>".
    auth_token: str = ""
    reflection: bool = True
    # sys.setswitchinterval for the serving process. The engine thread, the gRPC loop and the stream sessions share
    # one GIL; at CPython's 5 ms default a thread waiting for it stalls whole decode steps. 0.5 ms took the p50
    # decode latency of 16 live streams on an H100 from 4.8 s to 1.7 s (docs/streaming.md). 0 leaves it alone.
    gil_switch_interval_ms: float = 0.5
    # Prometheus /metrics on its own plain-HTTP port (prometheus_client's server), apart from the gRPC port so
    # scrapers need no gRPC and TLS; 0: not served (docs/operations.md lists the series).
    metrics_port: int = 0
    # gRPC front processes sharing the port (SO_REUSEPORT; edge/fronts.py): 1 is one process that owns its engine
    # processes; N > 1 a parent that supervises the engine processes and N fronts (the engine process is then on,
    # for the fake engine too). More fronts when one front's core is the limit (~128 live streams per core).
    front_processes: int = 1
    # The OpenAI-compatible HTTP API (POST /v1/audio/transcriptions, docs/http.md) on this port beside the gRPC one,
    # in the same process over the same engines. None (unset): not served; 0 picks a free port (tests), as --port 0.
    http_port: int | None = None


@dataclass(frozen=True)
class StreamingConfig:
    # A live stream that sends no message for this long ends with OUT_OF_RANGE (its open utterance is flushed as a
    # final first); GetServerInfo reports it as ServerLimits.stream_idle_timeout_ms.
    idle_timeout_s: float = 30.0
    # Live streams each engine replica takes; past (this x replicas), a new stream is refused RESOURCE_EXHAUSTED
    # with retry advice. 256 is the per-GPU target of the streaming work, not yet measured on a GPU (see
    # docs/streaming.md); 0: no limit.
    max_live_streams_per_replica: int = 256
    # A final later than this after its utterance ended is logged as the stream falling behind real time.
    max_stream_lag_ms: float = 2000.0
    # Endpointing's trailing silence when a request leaves it 0 (docs/streaming.md says why 800 ms). Voice-bot and
    # IVR deployments whose callers cannot set it per stream set it here, down to 200 ms.
    trailing_silence_ms: int = 800
    # Speculative finals: once an open utterance has been silent this long, its final is decoded ahead of the
    # endpoint (and dropped if speech resumes), so it is ready when the trailing silence runs out. 240 ms: longer
    # than the gaps inside fluent speech (between words, stop closures: mostly under 200 ms), so only real pauses
    # (a breath, a comma) waste a decode, and it leaves 560 ms of the default 800 ms wait for the decode. At most
    # half a stream's trailing silence (a 200 ms voice-bot stream speculates after 96 ms). 0: off.
    # docs/streaming.md says more.
    speculative_final_after_ms: int = 240
    # Wall-clock cap on one live stream, for load balancing: a gRPC stream stays on the replica it opened on, so a
    # fleet only rebalances as streams end. At the cap the open utterance is flushed as a final and the call ends
    # UNAVAILABLE with RetryInfo 0 s and the processed_audio_ms to resume from. 0 (default): no cap, because a
    # client that does not resume would lose the rest of its call; streams still end at --max-audio-duration-s of
    # audio (RESOURCE_EXHAUSTED). docs/operations.md suggests 1800 behind a balancer with resuming clients.
    max_duration_s: float = 0.0


# ---- Serving in a mesh: TLS and connection policy (docs/operations.md) ----


@dataclass(frozen=True)
class TlsConfig:
    # PEM files. Both empty: a plaintext port. The files are re-read when they change (certificate rotation).
    cert_file: str = ""
    key_file: str = ""
    # mTLS: clients must present a certificate signed by one of these CAs. grpc's Python server either ignores
    # client certificates or requires them, so the CA and --tls-require-client-cert come together.
    client_ca_file: str = ""
    require_client_cert: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True)
class ConnectionConfig:
    """HTTP/2 connection policy, as gRPC server options; why these defaults: docs/operations.md."""

    # Streams (calls) one connection may have open; more wait in the client. A guard against a runaway client, not
    # a balancer: as many as the engine queue holds (--max-queued-requests), so a gateway multiplexing hundreds of
    # live calls over one connection is not throttled.
    max_concurrent_streams: int = 1024
    # A connection without calls for this long gets GOAWAY: before the usual middlebox idle timeouts (AWS NLB 350 s),
    # so the server, not a silent proxy, ends it. 0: never.
    max_connection_idle_ms: int = 300_000
    # GOAWAY to a connection this old (grpc adds +-10% jitter), so clients re-resolve and spread over new replicas;
    # its open calls get the grace to finish, then the connection closes. 0: never.
    max_connection_age_ms: int = 1_800_000
    max_connection_age_grace_ms: int = 600_000
    # The server pings a connection quiet this long and drops it when no ack comes within the timeout: a caller
    # that vanished (no FIN) frees its streams.
    keepalive_time_ms: int = 60_000
    keepalive_timeout_ms: int = 20_000
    # Client pings closer than this (with no data in between) are strikes; past max_ping_strikes a GOAWAY
    # too_many_pings. Below 5000 so a client pinging every 5 s, timer jitter included, is never struck.
    # Client pings on a connection without calls are allowed (grpc.keepalive_permit_without_calls=1).
    min_ping_interval_ms: int = 4_000
    max_ping_strikes: int = 2
    # A connection must finish its TLS and HTTP/2 handshake within this; a TCP connection that sends nothing is
    # closed after it.
    handshake_timeout_ms: int = 20_000


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    connection: ConnectionConfig = field(default_factory=ConnectionConfig)

    @property
    def replica_devices(self) -> tuple[str, ...]:
        """The devices to run one engine replica on: --devices when given, else the single --device."""
        return self.engine.devices or (self.model.device,)

    @property
    def live_streams_per_front(self) -> int:
        """The live streams one front process admits (0: no limit): --max-live-streams-per-replica x replicas,
        shared over --front-processes (rounded up). The kernel spreads connections over the fronts about evenly
        (SO_REUSEPORT); one count shared between processes would put a lock on every open."""
        total = self.streaming.max_live_streams_per_replica * len(self.replica_devices)
        return -(-total // self.server.front_processes)


class ConfigError(ValueError):
    pass


T = TypeVar("T")

# (section, field, flag, type, help). The environment variable is ASR_ + the flag, upper-case, "-" -> "_".
_FLAGS: tuple[tuple[str, str, str, Callable[[str], Any], str], ...] = (
    ("server", "host", "--host", str, "address to listen on"),
    ("server", "port", "--port", int, "port to listen on; 0 picks a free one"),
    ("server", "grace_period_s", "--grace-period-s", float, "on SIGTERM, time for in-flight calls"),
    ("server", "auth_token", "--auth-token", str, "require 'authorization: Bearer <token>'"),
    (
        "server",
        "gil_switch_interval_ms",
        "--gil-switch-interval-ms",
        float,
        "sys.setswitchinterval for the process in ms; 0 keeps Python's default",
    ),
    ("server", "metrics_port", "--metrics-port", int, "Prometheus /metrics on this HTTP port; 0: off"),
    (
        "server",
        "front_processes",
        "--front-processes",
        int,
        "gRPC front processes sharing the port (SO_REUSEPORT); > 1 forces the engine process on",
    ),
    (
        "server",
        "http_port",
        "--http-port",
        int,
        "OpenAI-compatible HTTP API (/v1/audio/transcriptions) on this port; unset: off, 0: a free port",
    ),
    ("model", "model", "--model", str, "hub id or local directory (-hf or original layout)"),
    ("model", "dtype", "--dtype", str, "auto, bfloat16, float16 or float32"),
    ("model", "device", "--device", str, "auto, cpu, cuda, cuda:N"),
    ("model", "device_map", "--device-map", str, "transformers device_map (e.g. auto) instead of --device"),
    ("model", "attn_implementation", "--attn-implementation", str, "sdpa, eager, flash_attention_2"),
    ("engine", "kind", "--engine", str, "continuous (default), transformers (padded generate), or fake"),
    ("engine", "max_inference_batch_size", "--max-inference-batch-size", int, "most chunks per batch"),
    ("engine", "max_batch_wait_ms", "--max-batch-wait-ms", float, "wait for a batch to fill"),
    ("engine", "max_queued_requests", "--max-queued-requests", int, "queue bound before RESOURCE_EXHAUSTED"),
    ("engine", "default_max_new_tokens", "--max-new-tokens", int, "tokens per chunk when a request says 0"),
    ("engine", "max_new_tokens_limit", "--max-new-tokens-limit", int, "most tokens a request may ask for"),
    ("engine", "fake_batch_delay_ms", "--fake-batch-delay-ms", float, "fake engine: time per batch"),
    ("engine.continuous", "max_running", "--max-running-requests", int, "continuous: most requests decoding at once"),
    (
        "engine.continuous",
        "kv_cache_tokens",
        "--kv-cache-tokens",
        int,
        "continuous: KV cache size in tokens; 0: from memory",
    ),
    (
        "engine.continuous",
        "kv_cache_memory_fraction",
        "--kv-cache-memory-fraction",
        float,
        "continuous: share of free device memory for the KV cache",
    ),
    (
        "engine.continuous",
        "max_context_tokens",
        "--max-context-tokens",
        int,
        "continuous: longest prompt + output per chunk",
    ),
    (
        "engine.continuous",
        "max_prefill_tokens",
        "--max-prefill-tokens",
        int,
        "continuous: prompt tokens prefilled per step",
    ),
    (
        "engine.continuous",
        "encoder_batch_audio_s",
        "--encoder-batch-audio-s",
        float,
        "continuous: audio per encoder batch",
    ),
    ("engine.continuous", "kv_cache_dtype", "--kv-cache-dtype", str, "continuous: auto (model dtype) or fp8 (CUDA)"),
    (
        "engine.continuous",
        "features",
        "--features",
        str,
        "continuous: log-mel by the reference extractor on the preprocess threads, or torch (batched, on the "
        "engine's device); auto: torch on CUDA",
    ),
    (
        "engine.continuous",
        "max_step_tokens",
        "--max-step-tokens",
        int,
        "continuous: chunked prefill, tokens per engine step (decode rows first, then prefill chunks); 0: off",
    ),
    (
        "engine.continuous",
        "stream_cache_max_streams",
        "--stream-cache-max-streams",
        int,
        "continuous: live utterances whose completed encoder windows are kept (torch features); 0: off",
    ),
    (
        "engine.continuous",
        "stream_cache_max_mib",
        "--stream-cache-max-mib",
        float,
        "continuous: device MiB for the live utterances' encoder windows, in all",
    ),
    (
        "engine.continuous",
        "stream_cache_max_kv_mib",
        "--stream-cache-max-kv-mib",
        float,
        "continuous: device MiB for the live utterances' decoder KV prefixes (outside the KV pages); 0: none",
    ),
    (
        "engine.continuous",
        "max_draft_tokens",
        "--max-draft-tokens",
        int,
        "continuous: a live final verifies up to this many of its last interim's tokens in its prefill; 0: off",
    ),
    (
        "engine.continuous",
        "async_prefill",
        "--async-prefill",
        str,
        "continuous: prefill on its own thread and CUDA stream beside the decode steps: auto (CUDA), on or off",
    ),
    (
        "engine.continuous",
        "trace_path",
        "--bench-trace-path",
        str,
        "benchmarks only: JSON-lines timeline of every request and step of the continuous engine",
    ),
    ("engine", "devices", "--devices", parse_device_list, "one engine replica per device, e.g. cuda:0,cuda:1"),
    (
        "engine",
        "process",
        "--engine-process",
        str,
        "engine core in its own process per replica: auto (on for CUDA models), on or off",
    ),
    (
        "engine",
        "bench_forced_tokens_per_audio_s",
        "--bench-forced-tokens-per-audio-s",
        float,
        "benchmarks only: force N tokens per audio second (+6), ignoring EOS; 0 = off",
    ),
    ("limits", "max_audio_duration_s", "--max-audio-duration-s", int, "longest audio per request"),
    ("limits", "max_message_bytes", "--max-message-bytes", int, "largest request message"),
    ("limits", "max_stream_bytes", "--max-stream-bytes", int, "most audio bytes per client stream"),
    (
        "limits",
        "max_decoded_audio_mb",
        "--max-decoded-audio-mb",
        int,
        "MiB of decoded audio all requests in flight may hold; 0: no bound",
    ),
    ("limits", "max_chunk_s", "--max-chunk-s", int, "longest chunk decoded in one piece"),
    (
        "limits",
        "max_chunk_with_timestamps_s",
        "--max-chunk-with-timestamps-s",
        int,
        "longest chunk when word timestamps are asked for",
    ),
    ("aligner", "model", "--aligner-model", str, "forced aligner hub id or directory; empty: none"),
    ("aligner", "mode", "--aligner-mode", str, "spawn (supervised sidecar) or connect"),
    ("aligner", "address", "--aligner-address", str, "sidecar address: unix:///path or host:port"),
    ("aligner", "dtype", "--aligner-dtype", str, "aligner dtype"),
    ("aligner", "device", "--aligner-device", str, "aligner device"),
    ("aligner", "max_batch_size", "--aligner-max-batch-size", int, "aligner batch size"),
    ("aligner", "max_batch_wait_ms", "--aligner-max-batch-wait-ms", float, "aligner: wait for a batch to fill"),
    ("aligner", "timeout_s", "--aligner-timeout-s", float, "deadline of one alignment (UNAVAILABLE after)"),
    ("streaming", "idle_timeout_s", "--stream-idle-timeout-s", float, "end a live stream idle this long"),
    (
        "streaming",
        "max_live_streams_per_replica",
        "--max-live-streams-per-replica",
        int,
        "live streams per engine replica before new ones get RESOURCE_EXHAUSTED; 0: no limit",
    ),
    ("streaming", "max_stream_lag_ms", "--max-stream-lag-ms", float, "log a live stream whose final is this late"),
    (
        "streaming",
        "max_duration_s",
        "--max-stream-duration-s",
        float,
        "end a live stream after this long (flushed, UNAVAILABLE, resume elsewhere); 0: no cap",
    ),
    (
        "streaming",
        "trailing_silence_ms",
        "--trailing-silence-ms",
        int,
        "endpointing: silence that ends an utterance when the request leaves it 0 (100..10000)",
    ),
    (
        "streaming",
        "speculative_final_after_ms",
        "--speculative-final-after-ms",
        int,
        "live streams: decode a final ahead of the endpoint after this much silence (0: off; 0..10000)",
    ),
    ("tracing", "exporter", "--tracing", str, "none, console or otlp"),
    ("tracing", "otlp_endpoint", "--otlp-endpoint", str, "OTLP gRPC endpoint"),
    ("tracing", "service_name", "--service-name", str, "service.name of spans"),
)

_BOOL_FLAGS: tuple[tuple[str, str, str, str], ...] = (
    ("engine", "warmup", "--no-warmup", "skip the warm-up batch before reporting SERVING"),
    ("engine.continuous", "cuda_graphs", "--no-cuda-graphs", "continuous engine: run decode steps eagerly"),
    ("server", "reflection", "--no-reflection", "do not register server reflection"),
)


# Serving in a mesh: TLS and connection policy. Value flags as in _FLAGS; on-flags set True.
_MESH_FLAGS: tuple[tuple[str, str, str, Callable[[str], Any], str], ...] = (
    ("tls", "cert_file", "--tls-cert-file", str, "TLS certificate chain (PEM); with --tls-key-file: TLS port"),
    ("tls", "key_file", "--tls-key-file", str, "TLS private key (PEM)"),
    ("tls", "client_ca_file", "--tls-client-ca-file", str, "mTLS: CA bundle (PEM) that signs client certificates"),
    ("connection", "max_concurrent_streams", "--max-concurrent-streams", int, "most open calls per connection"),
    ("connection", "max_connection_idle_ms", "--max-connection-idle-ms", int, "GOAWAY after this long idle; 0: never"),
    ("connection", "max_connection_age_ms", "--max-connection-age-ms", int, "GOAWAY to connections this old; 0: never"),
    (
        "connection",
        "max_connection_age_grace_ms",
        "--max-connection-age-grace-ms",
        int,
        "after the max-age GOAWAY, time for its open calls",
    ),
    ("connection", "keepalive_time_ms", "--keepalive-time-ms", int, "ping a connection quiet this long"),
    ("connection", "keepalive_timeout_ms", "--keepalive-timeout-ms", int, "close when a ping is unacked this long"),
    (
        "connection",
        "min_ping_interval_ms",
        "--min-ping-interval-ms",
        int,
        "client pings closer than this without data are strikes",
    ),
    ("connection", "max_ping_strikes", "--max-ping-strikes", int, "strikes before GOAWAY too_many_pings; 0: no limit"),
    ("connection", "handshake_timeout_ms", "--handshake-timeout-ms", int, "TLS + HTTP/2 handshake deadline"),
)
_MESH_ON_FLAGS: tuple[tuple[str, str, str, str], ...] = (
    ("tls", "require_client_cert", "--tls-require-client-cert", "mTLS: refuse clients without a valid certificate"),
)

# Tests and benchmarks only: they work as any flag (and ASR_* variable) but stay out of --help, which is for
# operators. docs/benchmarks.md documents them.
_HIDDEN_FLAGS = frozenset({"--fake-batch-delay-ms", "--bench-forced-tokens-per-audio-s", "--bench-trace-path"})


def _env_name(flag: str, prefix: str = "ASR_") -> str:
    return prefix + flag.lstrip("-").upper().replace("-", "_")


def _add_value_flag(
    parser: argparse.ArgumentParser, flag: str, dest: str, help_text: str, env: str, default: Any
) -> None:
    # default=None so that a flag left out can be told from one given, and the environment consulted.
    shown = argparse.SUPPRESS if flag in _HIDDEN_FLAGS else f"{help_text} [{env}; {default!r}]"
    parser.add_argument(flag, dest=dest, metavar=dest.rsplit(".", 1)[-1].upper(), default=None, help=shown)


def _raw_value(args: argparse.Namespace, dest: str, environ: Mapping[str, str], env: str) -> str | None:
    """The flag's text if it was given, else the environment variable's, else None."""
    raw = getattr(args, dest, None)
    return environ.get(env) if raw is None else str(raw)


def _section(config: Config, path: str) -> Any:
    """The config section at a dotted path ("engine", "engine.continuous")."""
    node: Any = config
    for part in path.split("."):
        node = getattr(node, part)
    return node


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Config()
    for section, name, flag, _type, help_text in _FLAGS:
        default = getattr(_section(defaults, section), name)
        _add_value_flag(parser, flag, f"{section}.{name}", help_text, _env_name(flag), default)
    for section, name, flag, help_text in _BOOL_FLAGS:
        parser.add_argument(
            flag,
            dest=f"{section}.{name}",
            action="store_const",
            const=False,
            default=None,
            help=f"{help_text} [{_env_name(flag)}=1]",
        )
    _add_mesh_arguments(parser, defaults)


def _add_mesh_arguments(parser: argparse.ArgumentParser, defaults: Config) -> None:
    group = parser.add_argument_group("TLS and connection policy (docs/operations.md)")
    for section, name, flag, _type, help_text in _MESH_FLAGS:
        default = getattr(getattr(defaults, section), name)
        shown = f"{help_text} [{_env_name(flag)}; {default!r}]"
        group.add_argument(flag, dest=f"{section}.{name}", metavar=name.upper(), default=None, help=shown)
    for section, name, flag, help_text in _MESH_ON_FLAGS:
        group.add_argument(
            flag,
            dest=f"{section}.{name}",
            action="store_const",
            const=True,
            default=None,
            help=f"{help_text} [{_env_name(flag)}=1]",
        )


def _parse_value(raw: str, kind: Callable[[str], Any], flag: str) -> Any:
    try:
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(f"{flag}: cannot read {excerpt(raw)}: {excerpt(str(exc), 200)}") from exc


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Builds the config from parsed flags and the environment, then checks it."""
    values: dict[str, dict[str, Any]] = {f.name: {} for f in dataclasses.fields(Config)}
    values["engine.continuous"] = {}
    for section, name, flag, kind, _help in _FLAGS:
        raw = _raw_value(args, f"{section}.{name}", environ, _env_name(flag))
        if raw is not None:
            values[section][name] = _parse_value(raw, kind, flag)
    for section, name, flag, _help in _BOOL_FLAGS:
        raw_flag = getattr(args, f"{section}.{name}", None)
        env = environ.get(_env_name(flag), "")
        if raw_flag is False or env.lower() in ("1", "true", "yes"):
            values[section][name] = False
    _read_mesh_values(args, environ, values)
    config = Config(
        server=ServerConfig(**values["server"]),
        model=ModelConfig(**values["model"]),
        engine=EngineConfig(**values["engine"], continuous=ContinuousConfig(**values["engine.continuous"])),
        limits=LimitsConfig(**values["limits"]),
        aligner=AlignerConfig(**values["aligner"]),
        tracing=TracingConfig(**values["tracing"]),
        streaming=StreamingConfig(**values["streaming"]),
        tls=TlsConfig(**values["tls"]),
        connection=ConnectionConfig(**values["connection"]),
    )
    validate(config)
    return config


def _read_mesh_values(args: argparse.Namespace, environ: Mapping[str, str], values: dict[str, dict[str, Any]]) -> None:
    for section, name, flag, kind, _help in _MESH_FLAGS:
        raw = _raw_value(args, f"{section}.{name}", environ, _env_name(flag))
        if raw is not None:
            values[section][name] = _parse_value(raw, kind, flag)
    for section, name, flag, _help in _MESH_ON_FLAGS:
        raw_flag = getattr(args, f"{section}.{name}", None)
        if raw_flag is True or environ.get(_env_name(flag), "").lower() in ("1", "true", "yes"):
            values[section][name] = True


def parse_serve_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    parser = argparse.ArgumentParser(prog="asr-server serve")
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)), environ)


def validate(config: Config) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    e, lim, t = config.engine, config.limits, config.tracing
    need(
        e.kind in ("continuous", "transformers", "fake"),
        f"--engine must be continuous, transformers or fake, not {excerpt(e.kind)}",
    )
    need(e.process in ("auto", "on", "off"), f"--engine-process must be auto, on or off, not {excerpt(e.process)}")
    c = e.continuous
    need(c.max_running >= 1, "--max-running-requests must be >= 1")
    need(c.kv_cache_dtype in ("auto", "fp8"), "--kv-cache-dtype must be auto or fp8")
    need(c.async_prefill in ("auto", "on", "off"), "--async-prefill must be auto, on or off")
    need(c.kv_cache_tokens >= 0, "--kv-cache-tokens must be >= 0")
    need(0 < c.kv_cache_memory_fraction <= 1, "--kv-cache-memory-fraction must be in (0, 1]")
    need(c.max_context_tokens >= 256, "--max-context-tokens must be >= 256")
    need(c.max_prefill_tokens >= 1, "--max-prefill-tokens must be >= 1")
    need(c.features in ("auto", "reference", "torch"), "--features must be auto, reference or torch")
    need(
        c.max_step_tokens == 0 or c.max_step_tokens > c.max_running,
        "--max-step-tokens must be 0 (off) or more than --max-running-requests",
    )
    need(c.encoder_batch_audio_s > 0, "--encoder-batch-audio-s must be > 0")
    need(c.stream_cache_max_streams >= 0, "--stream-cache-max-streams must be >= 0")
    need(c.stream_cache_max_mib >= 0, "--stream-cache-max-mib must be >= 0")
    need(c.stream_cache_max_kv_mib >= 0, "--stream-cache-max-kv-mib must be >= 0")
    need(c.max_draft_tokens >= 0, "--max-draft-tokens must be >= 0")
    need(c.stream_cache_max_windows >= 0 and c.stream_cache_idle_s > 0, "stream cache bounds must be positive")
    need(e.bench_forced_tokens_per_audio_s >= 0, "--bench-forced-tokens-per-audio-s must be >= 0")
    need(e.max_inference_batch_size >= 1, "--max-inference-batch-size must be >= 1")
    need(e.max_batch_wait_ms >= 0, "--max-batch-wait-ms must be >= 0")
    need(e.max_queued_requests >= 1, "--max-queued-requests must be >= 1")
    need(
        1 <= e.default_max_new_tokens <= e.max_new_tokens_limit,
        "--max-new-tokens must be between 1 and --max-new-tokens-limit",
    )
    need(0 <= config.server.port <= 65535, "--port must be 0..65535")
    need(config.server.grace_period_s >= 0, "--grace-period-s must be >= 0")
    need(1 <= config.server.front_processes <= 64, "--front-processes must be in [1, 64]")
    need(
        config.server.front_processes == 1 or e.process != "off",
        "--front-processes > 1 needs the engine in its own process: not --engine-process off",
    )
    need(0 <= config.server.metrics_port <= 65535, "--metrics-port must be 0..65535 (0: off)")
    need(
        config.server.metrics_port == 0 or config.server.metrics_port != config.server.port,
        "--metrics-port must differ from --port",
    )
    _validate_http_port(config)
    need(
        not (config.model.device_map and len(e.devices) > 1),
        "--devices (one replica per device) and --device-map (one model split over devices) exclude each other",
    )
    need(
        config.server.gil_switch_interval_ms >= 0 and config.server.gil_switch_interval_ms <= 100,
        "--gil-switch-interval-ms must be in [0, 100]",
    )
    need(lim.max_audio_duration_s >= 1, "--max-audio-duration-s must be >= 1")
    need(lim.max_message_bytes >= 1024, "--max-message-bytes must be >= 1024")
    need(lim.max_stream_bytes >= lim.max_message_bytes, "--max-stream-bytes must be >= --max-message-bytes")
    need(lim.max_decoded_audio_mb >= 0, "--max-decoded-audio-mb must be >= 0 (0: no bound)")
    need(30 <= lim.max_chunk_s <= 1200, "--max-chunk-s must be 30..1200 (the model's trained range)")
    need(
        30 <= lim.max_chunk_with_timestamps_s <= 300,
        "--max-chunk-with-timestamps-s must be 30..300 (the aligner's 5000 classes x 80 ms cover 400 s)",
    )
    need(
        t.exporter in ("none", "console", "otlp"), f"--tracing must be none, console or otlp, not {excerpt(t.exporter)}"
    )
    need(config.streaming.idle_timeout_s > 0, "--stream-idle-timeout-s must be > 0")
    need(config.streaming.max_live_streams_per_replica >= 0, "--max-live-streams-per-replica must be >= 0")
    need(config.streaming.max_stream_lag_ms >= 0, "--max-stream-lag-ms must be >= 0")
    need(config.streaming.max_duration_s >= 0, "--max-stream-duration-s must be >= 0 (0: no cap)")
    need(100 <= config.streaming.trailing_silence_ms <= 10_000, "--trailing-silence-ms must be 100..10000")
    need(
        0 <= config.streaming.speculative_final_after_ms <= 10_000,
        "--speculative-final-after-ms must be 0..10000 (0: off)",
    )
    need(config.aligner.mode in ("spawn", "connect"), "--aligner-mode must be spawn or connect")
    need(config.aligner.max_batch_size >= 1, "--aligner-max-batch-size must be >= 1")
    need(config.aligner.max_batch_wait_ms >= 0, "--aligner-max-batch-wait-ms must be >= 0")
    need(config.aligner.timeout_s > 0, "--aligner-timeout-s must be > 0")
    need(
        config.aligner.mode != "connect" or not config.aligner.model or bool(config.aligner.address),
        "--aligner-mode connect needs --aligner-address",
    )
    _validate_mesh(config)


def _validate_http_port(config: Config) -> None:
    server = config.server
    if server.http_port is None:
        return
    if not 0 <= server.http_port <= 65535:
        raise ConfigError("--http-port must be 0..65535 (0: a free port; leave it unset for no HTTP API)")
    if server.http_port and server.http_port in (server.port, server.metrics_port or -1):
        raise ConfigError("--http-port must differ from --port and --metrics-port")
    if server.front_processes > 1:
        # Each front would need the HTTP port too (SO_REUSEPORT as the gRPC port); not built yet.
        raise ConfigError("--http-port is served by one front process: use it with --front-processes 1")


def _validate_mesh(config: Config) -> None:
    problem = _tls_problem(config.tls) or _connection_problem(config.connection)
    if problem:
        raise ConfigError(problem)


def _connection_problem(c: ConnectionConfig) -> str:
    problems = (
        (c.max_concurrent_streams < 1, "--max-concurrent-streams must be >= 1"),
        (c.max_connection_idle_ms < 0, "--max-connection-idle-ms must be >= 0 (0: never)"),
        (c.max_connection_age_ms < 0, "--max-connection-age-ms must be >= 0 (0: never)"),
        (c.max_connection_age_grace_ms < 0, "--max-connection-age-grace-ms must be >= 0"),
        (c.keepalive_time_ms < 1000, "--keepalive-time-ms must be >= 1000"),
        (c.keepalive_timeout_ms < 1, "--keepalive-timeout-ms must be >= 1"),
        (c.min_ping_interval_ms < 0, "--min-ping-interval-ms must be >= 0"),
        (c.max_ping_strikes < 0, "--max-ping-strikes must be >= 0 (0: no limit)"),
        (c.handshake_timeout_ms < 1, "--handshake-timeout-ms must be >= 1"),
    )
    return next((message for bad, message in problems if bad), "")


def _tls_problem(tls: TlsConfig) -> str:
    """The first thing wrong with the TLS flags, or "" (files are opened here so a typo fails at start-up)."""
    if bool(tls.cert_file) != bool(tls.key_file):
        return "--tls-cert-file and --tls-key-file go together: give both for TLS, or neither"
    if not tls.cert_file and (tls.client_ca_file or tls.require_client_cert):
        return "--tls-client-ca-file and --tls-require-client-cert need TLS: give --tls-cert-file and --tls-key-file"
    if bool(tls.client_ca_file) != tls.require_client_cert:
        return (
            "--tls-client-ca-file and --tls-require-client-cert go together: the server either requires client "
            "certificates signed by that CA or does not ask for one"
        )
    files = (
        ("--tls-cert-file", tls.cert_file, "CERTIFICATE"),
        ("--tls-key-file", tls.key_file, "PRIVATE KEY"),
        ("--tls-client-ca-file", tls.client_ca_file, "CERTIFICATE"),
    )
    for flag, path, pem_label in files:
        if path:
            problem = _pem_file_problem(flag, path, pem_label)
            if problem:
                return problem
    return ""


def _pem_file_problem(flag: str, path: str, pem_label: str) -> str:
    try:
        with open(path, "rb") as pem:
            text = pem.read()
    except OSError as exc:
        return f"{flag}: cannot read {path!r}: {exc.strerror or exc}"
    # "BEGIN PRIVATE KEY", "BEGIN RSA PRIVATE KEY", "BEGIN EC PRIVATE KEY" all end in the label.
    if b"-----BEGIN " not in text or pem_label.encode() + b"-----" not in text:
        return f"{flag}: {path!r} holds no PEM {pem_label}"
    return ""


def version_text() -> str:
    return f"asr-server {__version__}"


def add_log_level_argument(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    parser.add_argument(
        "--log-level",
        default=environ.get("ASR_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR [ASR_LOG_LEVEL; 'INFO']",
    )
    # Read before any config (logging comes first); a spawned aligner sidecar inherits ASR_LOG_FORMAT.
    parser.add_argument(
        "--log-format",
        default=environ.get("ASR_LOG_FORMAT", "text"),
        choices=("text", "json"),
        help="text, or json: one JSON object per line, tracebacks inside it [ASR_LOG_FORMAT; 'text']",
    )


# ---- `asr-server aligner`: the forced-aligner sidecar's own config ----


@dataclass(frozen=True)
class SidecarConfig:
    model: str = ""
    listen: str = "unix:///tmp/qwen-asr-aligner.sock"
    dtype: str = "auto"
    device: str = "auto"
    attn_implementation: str | None = None
    max_batch_size: int = 32
    max_batch_wait_ms: float = 5.0
    max_queued_requests: int = 1024
    # Exit when the process that started this one is gone (a SIGKILLed server cannot stop its sidecar).
    exit_with_parent: bool = False
    # Tests only: a pause before every batch (to catch requests in flight) and before loading (to kill a loading
    # sidecar).
    batch_delay_ms: float = 0.0
    load_delay_s: float = 0.0
    # Set by a supervising server: where to write, in one line, why the model could not be loaded.
    failure_file: str = ""


# (field, flag, type, help). The environment variable is ASR_ALIGNER_ + the flag, upper-case: the same names the
# server's --aligner-* flags read, so one environment configures both.
_SIDECAR_FLAGS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("model", "--model", str, "hub id or directory (-hf or original layout)"),
    ("listen", "--listen", str, "unix:///path or host:port (e.g. 0.0.0.0:50052 for a container)"),
    ("dtype", "--dtype", str, "auto, bfloat16, float16, float32"),
    ("device", "--device", str, "auto, cpu, cuda, cuda:N"),
    ("attn_implementation", "--attn-implementation", str, "sdpa, eager, flash_attention_2"),
    ("max_batch_size", "--max-batch-size", int, "most clips per batch"),
    ("max_batch_wait_ms", "--max-batch-wait-ms", float, "wait for a batch to fill"),
    ("max_queued_requests", "--max-queued-requests", int, "queue bound before RESOURCE_EXHAUSTED"),
)


def _sidecar_env_name(flag: str) -> str:
    return _env_name(flag, prefix="ASR_ALIGNER_")


def add_sidecar_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SidecarConfig()
    for name, flag, _type, help_text in _SIDECAR_FLAGS:
        _add_value_flag(parser, flag, f"sidecar.{name}", help_text, _sidecar_env_name(flag), getattr(defaults, name))
    parser.add_argument(
        "--exit-with-parent",
        dest="sidecar.exit_with_parent",
        action="store_true",
        help="exit when the process that started this one is gone",
    )
    parser.add_argument("--batch-delay-ms", dest="sidecar.batch_delay_ms", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--load-delay-s", dest="sidecar.load_delay_s", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--failure-file", dest="sidecar.failure_file", type=str, help=argparse.SUPPRESS)


def sidecar_config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> SidecarConfig:
    values: dict[str, Any] = {}
    for name, flag, kind, _help in _SIDECAR_FLAGS:
        raw = _raw_value(args, f"sidecar.{name}", environ, _sidecar_env_name(flag))
        if raw is not None and raw != "":
            values[name] = _parse_value(raw, kind, flag)
    for name in ("batch_delay_ms", "load_delay_s", "failure_file"):
        if getattr(args, f"sidecar.{name}", None) is not None:
            values[name] = getattr(args, f"sidecar.{name}")
    values["exit_with_parent"] = bool(getattr(args, "sidecar.exit_with_parent", False))
    config = SidecarConfig(**values)
    problems = [
        (not config.model, "--model is required (e.g. Qwen/Qwen3-ForcedAligner-0.6B-hf or a local directory)"),
        (config.max_batch_size < 1, "--max-batch-size must be >= 1"),
        (config.max_batch_wait_ms < 0, "--max-batch-wait-ms must be >= 0"),
        (config.max_queued_requests < 1, "--max-queued-requests must be >= 1"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(message)
    return config


def parse_sidecar_config(argv: Sequence[str], environ: Mapping[str, str]) -> SidecarConfig:
    parser = argparse.ArgumentParser(prog="asr-server aligner")
    add_sidecar_arguments(parser)
    return sidecar_config_from_args(parser.parse_args(list(argv)), environ)
