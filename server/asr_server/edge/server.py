"""The grpc.aio server: services, health, reflection, auth, and the start/stop lifecycle.

Health is NOT_SERVING from the moment the port opens until the model is loaded and warmed up, SERVING
after, and NOT_SERVING again as soon as shutdown begins; in-flight calls then get the grace period to finish
while health keeps answering NOT_SERVING and new calls are refused UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from asr_server.aligner.managed import WORD_TIMESTAMPS_HEALTH_SERVICE, ManagedAligner
from asr_server.config import Config, ConnectionConfig
from asr_server.edge.http.app import HttpContext, ServingState, build_app
from asr_server.edge.http.server import HttpFront
from asr_server.edge.rpc import ObservingInterceptor, RpcInterceptor, with_behaviour
from asr_server.edge.servicer import AsrServicer
from asr_server.edge.tls import ReloadingCertificates, server_credentials
from asr_server.engine.core import CoreStats, EngineCore, core_stats
from asr_server.engine.factory import Engine, build_engine
from asr_server.engine.process.client import EngineProcess
from asr_server.engine.replicas import Replica, ReplicatedRunner
from asr_server.engine.runner import EngineRunner
from asr_server.errors import AsrError, Unavailable
from asr_server.heap import freeze_startup_heap
from asr_server.logs import AccessLog
from asr_server.metrics import AlignerLoad, MetricsEndpoint, ReplicaLoad, ServerMetrics
from asr_server.tracing import SERVICE, setup_tracing
from asr_server.transcription import AlignBackend, Transcriber, TranscriberLimits
from qwenasr.v1 import asr_pb2, asr_pb2_grpc

logger = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_OVERHEAD_BYTES = 1024 * 1024  # room for the config beside max_message_bytes of audio
# When the drain ends with no AsrService call left, the port closes with this grace: a health Check already in
# flight is answered (a probe reads NOT_SERVING, not CANCELLED) while new calls are refused UNAVAILABLE. Watch
# streams never end by themselves, so they are cancelled when it runs out; it is short for that reason.
_CLOSE_GRACE_S = 1.0


# Exit codes of `asr-server serve` (argparse's 2 is a bad flag).
EXIT_STARTUP = 1
EXIT_PORT = 3
EXIT_MODEL = 4


class StartupError(RuntimeError):
    """The server cannot start for a reason the operator can fix; the CLI prints its message as one line and
    exits with `exit_code`."""

    def __init__(self, message: str, *, exit_code: int = EXIT_STARTUP) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def bind_problem(host: str, port: int) -> str:
    """Why host:port cannot be listened on, found by binding it ourselves (gRPC's error does not say), or ""."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As gRPC binds: a port of a server that just exited (TIME_WAIT) is free to use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} is in use; stop the process holding it or pick another --port"
            if exc.errno == errno.EACCES:
                return f"port {port} needs privileges to listen on; pick a --port above 1023"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"--host {host} is not an address of this machine"
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return ""


class _AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Requires "authorization: Bearer <token>" on every call but health checks (probes carry no secrets)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(f"/{HEALTH_SERVICE_NAME}/"):
            return handler
        sent = [value for key, value in handler_call_details.invocation_metadata or () if key == "authorization"]
        if len(sent) > 1:
            # Which one would count differs between proxies and servers; a request smuggling a second one is refused.
            return _deny(handler, f"{len(sent)} 'authorization' metadata entries: send exactly one")
        # Constant-time: a plain == leaks through its timing how much of a guess was right.
        if sent and isinstance(sent[0], str) and hmac.compare_digest(sent[0].encode(), self._expected.encode()):
            return handler
        return _deny(handler, "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'")


def _deny(handler: Any, message: str) -> Any:

    async def deny_unary(request: object, context: grpc.aio.ServicerContext[object, object]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: object, context: grpc.aio.ServicerContext[object, object]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    return with_behaviour(handler, deny_stream if handler.response_streaming else deny_unary)


@dataclass(frozen=True)
class LiveLoad:
    live_streams: int
    # Requests the engine cores hold waiting for a batch slot, over all of this server's engine replicas (an engine
    # process's as of its last stats push, at most a second old).
    engine_waiting_requests: int


class _InFlight:
    """Counts the AsrService calls in progress, so shutdown waits for them and not for health Watch streams."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class _InFlightInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, in_flight: _InFlight) -> None:
        self._in_flight = in_flight
        self._prefix = "/" + asr_pb2.DESCRIPTOR.services_by_name["AsrService"].full_name + "/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or not (handler_call_details.method or "").startswith(self._prefix):
            return handler
        return _counted(handler, self._in_flight)


def _counted(handler: Any, in_flight: _InFlight) -> Any:
    if handler.response_streaming:
        inner_stream = handler.stream_stream if handler.request_streaming else handler.unary_stream

        async def stream_behaviour(request: object, context: grpc.aio.ServicerContext[object, object]) -> Any:
            in_flight.enter()
            try:
                responses = inner_stream(request, context)
                if hasattr(responses, "__aiter__"):
                    async for response in responses:
                        yield response
                else:  # a handler that writes with context.write() and returns nothing
                    await responses
            finally:
                in_flight.leave()

        behaviour: Any = stream_behaviour
    else:
        inner_unary = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def unary_behaviour(request: object, context: grpc.aio.ServicerContext[object, object]) -> Any:
            in_flight.enter()
            try:
                return await inner_unary(request, context)
            finally:
                in_flight.leave()

        behaviour = unary_behaviour
    return with_behaviour(handler, behaviour)


def connection_options(policy: ConnectionConfig) -> list[tuple[str, int]]:
    """The connection policy as gRPC server channel arguments (docs/operations.md)."""
    options = [
        ("grpc.max_concurrent_streams", policy.max_concurrent_streams),
        ("grpc.keepalive_time_ms", policy.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", policy.keepalive_timeout_ms),
        # Mesh clients and sidecars keep idle connections warm with pings; they are not abuse.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", policy.min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", policy.max_ping_strikes),
        ("grpc.server_handshake_timeout_ms", policy.handshake_timeout_ms),
    ]
    # Left out, gRPC never closes a connection for idleness or age.
    if policy.max_connection_idle_ms:
        options.append(("grpc.max_connection_idle_ms", policy.max_connection_idle_ms))
    if policy.max_connection_age_ms:
        options.append(("grpc.max_connection_age_ms", policy.max_connection_age_ms))
        options.append(("grpc.max_connection_age_grace_ms", policy.max_connection_age_grace_ms))
    return options


class AsrServer:
    def __init__(
        self,
        config: Config,
        *,
        core_factory: Callable[[], EngineCore] | None = None,
        aligner: AlignBackend | None = None,
        engine: Engine | None = None,
        freeze_heap: bool = False,
    ) -> None:
        self.config = config
        # Set by process entry points (asr_server/heap.py says why tests leave it off).
        self._freeze_heap = freeze_heap
        # `engine`: a front process's links to the shared engine processes (edge/fronts.py).
        self.engine: Engine = engine if engine is not None else build_engine(config, core_factory=core_factory)
        if aligner is None and config.aligner.model:
            from asr_server.aligner.managed import SidecarAligner

            aligner = SidecarAligner(config.aligner)
        self.aligner = aligner
        self._serving = False
        self._health_updates: set[asyncio.Future[None]] = set()
        self.transcriber = Transcriber(
            self.engine,
            aligner,
            TranscriberLimits(config.limits.max_chunk_s, config.limits.max_chunk_with_timestamps_s),
        )
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._server: grpc.aio.Server | None = None
        self._servicer: AsrServicer | None = None
        self._in_flight = _InFlight()
        self.port = 0
        self._stopping = False
        # With TLS: the reloading certificate files (their reload count is what tests and operators can read).
        self.certificates: ReloadingCertificates | None = None
        # Recorded always (cheap); served only with --metrics-port.
        self.metrics = ServerMetrics(
            live_streams=self._live_streams, engine_load=self._engine_load, aligner_load=self._aligner_load
        )
        self._metrics_endpoint: MetricsEndpoint | None = None
        # The OpenAI-compatible HTTP front (--http-port), over this server's transcriber; None when not served.
        self._http: HttpFront | None = None
        self.http_port = 0

    async def start(self) -> int:
        """Opens the port (health NOT_SERVING), loads and warms the engine, then reports SERVING."""
        max_bytes = self.config.limits.max_message_bytes + _OVERHEAD_BYTES
        # Auth first: a refused call is never counted as in flight and is refused whatever its bytes. The error
        # path innermost, so that the in-flight count also covers a call's status being sent.
        # Observing outermost: the access log and the metrics see every call's final status, auth refusals too.
        interceptors: list[grpc.aio.ServerInterceptor] = [  # type: ignore[type-arg]
            ObservingInterceptor([self.metrics, AccessLog()])
        ]
        if self.config.server.auth_token:
            interceptors.append(_AuthInterceptor(self.config.server.auth_token))
        interceptors.append(_InFlightInterceptor(self._in_flight))
        interceptors.append(RpcInterceptor(refusal=self._refusal))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                # Off for one front: a second server on the port fails instead of sharing it unnoticed. On for
                # several fronts (edge/fronts.py): the kernel spreads connections over them.
                ("grpc.so_reuseport", 1 if self._shares_port else 0),
                *connection_options(self.config.connection),
            ],
        )
        servicer = AsrServicer(
            self.config,
            self.transcriber,
            model_id=lambda: self.engine.model_id,
            aligner_ready=self._aligner_ready,
            stream_observer=self.metrics,
        )
        self._servicer = servicer
        asr_pb2_grpc.add_AsrServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.config.server.reflection:
            names = (
                asr_pb2.DESCRIPTOR.services_by_name["AsrService"].full_name,
                HEALTH_SERVICE_NAME,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(names, server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        host, port = self.config.server.host, self.config.server.port
        # Probed first, so that a port in use is one line of ours, not gRPC's error log and a traceback.
        # (A front of several binds a port its parent reserved and probed: a probe without SO_REUSEPORT would fail.)
        problem = bind_problem(host, port) if port and not self._shares_port else ""
        if not problem:
            try:
                self.port = self._add_port(server)
            except RuntimeError as exc:
                if "bind" not in str(exc).lower():  # only grpc's "Failed to bind to address" is ours to explain
                    raise
                self.port = 0
        if self.port == 0:
            problem = problem or bind_problem(host, port) or f"cannot listen on {host}:{port}"
            raise StartupError(problem, exit_code=EXIT_PORT)
        await server.start()
        self._server = server
        if self.config.server.metrics_port:
            self._metrics_endpoint = self._serve_metrics()
        if self.config.server.http_port is not None:
            # Open before the engine loads, as the gRPC port: /health answers 503 "starting" meanwhile.
            await self._serve_http(self.config.server.http_port, servicer)
        logger.info("listening on port %d; loading the engine", self.port)
        if isinstance(self.aligner, ManagedAligner):
            # The sidecar loads in its own process while the engine loads here.
            self.aligner.add_listener(self._on_aligner_change)
            await self._set_word_timestamps_health()
            await self.aligner.start()
        # An engine process that dies takes "" and the AsrService to NOT_SERVING until its restart is ready.
        self.engine.add_listener(self._on_engine_change)
        try:
            await self.engine.start()
        except RuntimeError as exc:
            # The worker raises RuntimeError from the loader's failure; a loader's AsrError (FailedPrecondition:
            # no such directory or hub id, not a Qwen3-ASR checkpoint, no CUDA) is the operator's to fix.
            cause = exc.__cause__
            if isinstance(cause, AsrError):
                raise StartupError(
                    f"cannot load --model {self.config.model.model!r}: {_first_line(cause)}", exit_code=EXIT_MODEL
                ) from exc
            raise
        await servicer.warm_up()
        if self._freeze_heap:
            # Once, before health says SERVING; the collection blocks the loop for well under a second.
            freeze_startup_heap("front")
        if not self._stopping:
            self._serving = True
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            if self.aligner is not None:
                await self._set_word_timestamps_health()
            logger.info("serving %s", self.engine.model_id)
        return self.port

    @property
    def _shares_port(self) -> bool:
        return self.config.server.front_processes > 1

    def _add_port(self, server: grpc.aio.Server) -> int:
        address = f"{self.config.server.host}:{self.config.server.port}"
        if not self.config.tls.enabled:
            return server.add_insecure_port(address)
        credentials, self.certificates = server_credentials(self.config.tls)
        mode = "mTLS (client certificates required)" if self.config.tls.require_client_cert else "TLS"
        logger.info("%s on %s with %s", mode, address, self.config.tls.cert_file)
        return server.add_secure_port(address, credentials)

    def _serve_metrics(self) -> MetricsEndpoint:
        port = self.config.server.metrics_port
        try:
            endpoint = self.metrics.serve(port, self.config.server.host)
        except OSError as exc:
            raise StartupError(f"metrics port {port} cannot be opened ({exc.strerror or exc}); --metrics-port") from exc
        logger.info("Prometheus metrics on http://%s:%d/metrics", self.config.server.host, endpoint.port)
        return endpoint

    async def _serve_http(self, port: int, servicer: AsrServicer) -> None:
        context = HttpContext(
            config=self.config,
            transcriber=self.transcriber,
            model_id=lambda: self.engine.model_id or self.config.model.model,
            state=self._http_state,
            in_flight=self._in_flight,
            decoded_budget=servicer.decoded_budget,
            observers=(self.metrics, AccessLog()),
            created_s=int(time.time()),
        )
        front = HttpFront(build_app(context), self.config.server.host, port, self.config.tls)
        try:
            self.http_port = await front.start()
        except OSError as exc:
            problem = bind_problem(self.config.server.host, port).replace("--port", "--http-port")
            raise StartupError(problem or f"HTTP port {port} cannot be opened: {exc}", exit_code=EXIT_PORT) from exc
        self._http = front
        scheme = "https" if self.config.tls.enabled else "http"
        logger.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", scheme, self.config.server.host, self.http_port)

    def _http_state(self) -> ServingState:
        if self._stopping:
            return "draining"
        if not self._serving:
            return "starting"
        return "serving" if self.engine.state == "ready" else "unavailable"

    @property
    def metrics_port(self) -> int:
        """The port /metrics is served on; 0 when it is not."""
        return self._metrics_endpoint.port if self._metrics_endpoint is not None else 0

    def _live_streams(self) -> int:
        return self._servicer.live_streams if self._servicer is not None else 0

    def live_load(self) -> LiveLoad:
        """What an autoscaler weighs (edge/ray_autoscale.py): live streams open, requests waiting in the engine."""
        waiting = sum(load.waiting or 0 for load in self._engine_load())
        return LiveLoad(live_streams=self._live_streams(), engine_waiting_requests=waiting)

    def _engine_load(self) -> list[ReplicaLoad]:
        # Called on the scrape thread: each figure is one len() of the engine's own queues, a read the GIL keeps
        # whole, so the engine thread is neither locked nor polled.
        runners = self.engine.runners if isinstance(self.engine, ReplicatedRunner) else [self.engine]
        loads = []
        for index, runner in enumerate(runners):
            core = runner.core if isinstance(runner, EngineRunner) else None
            stats = _replica_core_stats(runner, core)
            waiting: int | None = None
            running: int | None = None
            if core is not None:
                waiting, running = core.num_waiting(), core.num_running()
            elif stats is not None:
                # An engine process's queues, as of its last pushed stats (at most STATS_PUSH_S old).
                waiting, running = stats.waiting_requests, stats.running_requests
            loads.append(
                ReplicaLoad(
                    replica=str(index), waiting=waiting, running=running, in_flight=runner.in_flight, core=stats
                )
            )
        return loads

    def _aligner_load(self) -> AlignerLoad | None:
        from asr_server.aligner.managed import SidecarAligner

        if not isinstance(self.aligner, SidecarAligner):
            return None
        supervisor = self.aligner.supervisor
        return AlignerLoad(self.aligner.client.in_flight, supervisor.restarts if supervisor is not None else 0)

    @property
    def in_flight_calls(self) -> int:
        """AsrService calls in progress (health and reflection calls are not counted)."""
        return self._in_flight.count

    def _aligner_ready(self) -> bool:
        if isinstance(self.aligner, ManagedAligner):
            return self.aligner.ready
        return self.aligner is not None

    def _on_engine_change(self, ready: bool) -> None:
        task = asyncio.ensure_future(self._set_engine_health())
        self._health_updates.add(task)  # a task nobody references may be garbage-collected before it runs
        task.add_done_callback(self._health_updates.discard)

    async def _set_engine_health(self) -> None:
        # Read when the task runs, not when the change was seen: of two quick changes, the later state wins.
        up = self._serving and not self._stopping and self.engine.state == "ready"
        serving = health_pb2.HealthCheckResponse.SERVING
        await self._set_health(serving if up else health_pb2.HealthCheckResponse.NOT_SERVING)

    def _on_aligner_change(self, ready: bool) -> None:
        task = asyncio.ensure_future(self._set_word_timestamps_health())
        self._health_updates.add(task)  # a task nobody references may be garbage-collected before it runs
        task.add_done_callback(self._health_updates.discard)

    async def _set_word_timestamps_health(self) -> None:
        # Transcription without timestamps does not need the aligner: "" stays SERVING while it is down.
        up = self._serving and not self._stopping and self._aligner_ready()
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(WORD_TIMESTAMPS_HEALTH_SERVICE, status)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING at once, then in-flight calls get `grace_s` to finish, then the engine stops.

        The port stays open through the grace: health `Check` and `Watch` keep answering NOT_SERVING (probes and
        balancers see a draining replica, not a dead one), and new AsrService calls are refused UNAVAILABLE with
        retry advice (`_refusal`). grpc's `server.stop(grace)` would refuse every new call at once, health
        checks included, which probes read as UNAVAILABLE instead of NOT_SERVING.
        """
        if self._stopping:
            return
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        grace = self.config.server.grace_period_s if grace_s is None else grace_s
        if self._server is not None:
            # Live streams never end by themselves: their open utterances are flushed as finals within the grace,
            # then they end UNAVAILABLE, so a caller loses no speech and reconnects elsewhere.
            draining = asyncio.create_task(self._servicer.drain_streams()) if self._servicer is not None else None
            close_grace_s: float | None = _CLOSE_GRACE_S
            try:
                await asyncio.wait_for(self._in_flight.wait_idle(), grace)
            except TimeoutError:
                logger.warning("grace period over with %d calls in flight; cancelling them", self._in_flight.count)
                close_grace_s = None  # out of time: the calls left are cancelled at once
            if draining is not None and not draining.done():
                draining.cancel()
            await self._server.stop(close_grace_s)
        if self._http is not None:
            # After the drain (its requests counted in _in_flight and answered 503 "draining" while it lasts).
            await self._http.stop()
            self._http = None
        await self.engine.stop()
        if isinstance(self.aligner, ManagedAligner):
            await self.aligner.stop()
        if self._metrics_endpoint is not None:
            # Last, so a scrape during the drain still answers.
            await asyncio.to_thread(self._metrics_endpoint.close)
            self._metrics_endpoint = None

    def _refusal(self) -> AsrError | None:
        """Why a new AsrService call is refused now (RpcInterceptor asks before each call), or None."""
        if self._stopping:
            return Unavailable("the server is shutting down; retry, on another replica")
        return None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(config: Config) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    if config.server.gil_switch_interval_ms > 0:
        sys.setswitchinterval(config.server.gil_switch_interval_ms / 1000)
    provider = setup_tracing(config.tracing)
    try:
        await _serve_until_signalled(config)
    finally:
        if provider is not None:
            # The batch exporter holds the last spans (the shutdown's among them) until flushed; it may block on
            # the network, hence a thread.
            await asyncio.to_thread(provider.shutdown)


async def _serve_until_signalled(config: Config) -> None:
    server = AsrServer(config, freeze_heap=True)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    start = asyncio.create_task(server.start())
    stop_wait = asyncio.create_task(stop_requested.wait())
    done, _ = await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    started = False
    try:
        if start in done:
            start.result()
            started = True
            # The HTTP port is written "http port N", not "on port N": scripts read the gRPC port by that phrase.
            http = f"; OpenAI-compatible HTTP API: http port {server.http_port}" if server.http_port else ""
            print(f"asr-server: serving {server.engine.model_id} on port {server.port}{http}", flush=True)
            await stop_wait
    finally:
        # Also after a failed start: the port, the engine thread and a spawned aligner sidecar are released.
        if started:
            logger.info("shutting down: NOT_SERVING, %.1f s grace for in-flight calls", config.server.grace_period_s)
        await server.stop()
        for task in (start, stop_wait):
            task.cancel()


def _replica_core_stats(runner: Replica, core: EngineCore | None) -> CoreStats | None:
    # An engine process pushes its core's stats; the scrape reads the last ones, never a round trip.
    if isinstance(runner, EngineProcess):
        return runner.core_stats
    return core_stats(core) if core is not None else None
