"""Scale-out on Ray Serve: `qwenasr.v1.AsrService` through Ray Serve's gRPC proxy, one engine per replica.

Each replica runs the standalone server (`AsrServer`: the same servicer, interceptors, error path, health and
drain) on a loopback port of its own, and the deployment's methods relay each call's messages to it as bytes.
So there is no second implementation of the RPCs: what a caller of the proxy gets is what the standalone server
answers, status codes and messages included (docs/scale-out.md says what Ray's proxy drops: status details and
trailing metadata of a failed call).

Ray is imported only by the functions that deploy (`build_app`, `serve_from_file`), never at import time, and
only by the `asr-server ray serve` entry point: Ray is the optional extra `.[ray]`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2

from asr_server.config import parse_serve_config
from asr_server.edge.ray_autoscale import ENGINE_WAITING_METRIC, LIVE_STREAMS_METRIC
from asr_server.edge.server import AsrServer, StartupError
from qwenasr.v1 import asr_pb2

logger = logging.getLogger(__name__)

ASR_SERVICE = asr_pb2.DESCRIPTOR.services_by_name["AsrService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# What Ray's proxy must register to route our methods (the `grpc_servicer_functions` of its gRPC options); the
# last is not a service: it makes the proxy answer UNAVAILABLE for a dead replica's calls (edge/ray_proxy.py).
GRPC_SERVICER_FUNCTIONS = (
    "qwenasr.v1.asr_pb2_grpc.add_AsrServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
    "asr_server.edge.ray_proxy.add_replica_death_status_to_server",
)
DEPLOYMENT_NAME = "AsrReplica"
# Ray's proxy routes a call to a replica on its own node (then its own zone) while one has room, not to the least
# loaded one: a node's proxy would fill its node's replicas to max_ongoing_requests first. Set in the environment of
# the processes that start Ray (the proxies inherit it), for power-of-two-choices over all replicas.
ROUTING_ENVIRONMENT = {
    "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
    "RAY_SERVE_PROXY_PREFER_LOCAL_AZ_ROUTING": "0",
}
# Metadata Ray's proxy adds for its own routing; not the caller's, so not relayed to the replica's server.
_PROXY_METADATA = frozenset({"application", "request_id", "multiplexed_model_id", "session_id", "user-agent"})
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Trailing metadata naming the replica (host:pid) that served a call: Ray's proxy passes trailers set on the call's
# context on, so operators (and the tests) can tell which replica a call went to.
REPLICA_METADATA = "asr-replica"


class _RayContext(Protocol):
    """The part of ray.serve.grpc_util.RayServegRPCContext the relay uses (Ray is not imported here)."""

    def invocation_metadata(self) -> list[tuple[str, str]]: ...

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...

    def set_trailing_metadata(self, trailing_metadata: list[tuple[str, str]]) -> None: ...


@dataclass(frozen=True)
class RawMessage:
    """A response the replica's server already serialized: Ray's replica calls SerializeToString() on what a
    method returns, so relaying the bytes spares a parse and a second serialization per message."""

    data: bytes

    def SerializeToString(self) -> bytes:  # noqa: N802 - protobuf's name, called by Ray
        return self.data


class RelayedCallError(Exception):
    """A call the replica's server ended with a status other than OK; Ray's proxy answers the status set on the
    call's context (code and details) when a method raises."""


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


class AsrReplica:
    """One Ray Serve replica: one standalone AsrServer (one engine, its aligner beside it) on a loopback port."""

    # Ray awaits an async constructor: the replica is ready (and routed to) only once its server serves.
    async def __init__(self, server_args: Sequence[str] = ()) -> None:  # type: ignore[misc]
        # The same flags as `asr-server serve`, read by the same parser; the replica listens on loopback only
        # (the proxy is the only caller), on a port of the kernel's choosing.
        config = parse_serve_config([*server_args, "--host", "127.0.0.1", "--port", "0"], os.environ)
        self._server = AsrServer(config)
        try:
            port = await self._server.start()
        except StartupError:
            await self._server.stop(grace_s=0.0)
            raise
        self._channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}",
            options=[
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ],
        )
        self.pid = os.getpid()
        self._replica = f"{socket.gethostname()}:{self.pid}"
        logger.info("Ray Serve replica %s: AsrService on 127.0.0.1:%d", self._replica, port)

    # ---- the AsrService (names are the RPCs': Ray's proxy routes by method name) ----

    async def Transcribe(self, request: Any, grpc_context: _RayContext) -> RawMessage:  # noqa: N802
        return await self._unary(f"/{ASR_SERVICE}/Transcribe", request, grpc_context)

    async def GetServerInfo(self, request: Any, grpc_context: _RayContext) -> RawMessage:  # noqa: N802
        return await self._unary(f"/{ASR_SERVICE}/GetServerInfo", request, grpc_context)

    async def Align(self, request: Any, grpc_context: _RayContext) -> RawMessage:  # noqa: N802
        return await self._unary(f"/{ASR_SERVICE}/Align", request, grpc_context)

    async def TranscribeStream(  # noqa: N802
        self, request_stream: AsyncIterator[Any], grpc_context: _RayContext
    ) -> RawMessage:
        call = self._channel.stream_unary(
            f"/{ASR_SERVICE}/TranscribeStream", request_serializer=_serialize, response_deserializer=None
        )
        try:
            return RawMessage(await call(request_stream, metadata=self._relayed_metadata(grpc_context)))
        except grpc.aio.AioRpcError as exc:
            raise _relayed_error(exc, grpc_context) from None

    async def StreamingRecognize(  # noqa: N802
        self, request_stream: AsyncIterator[Any], grpc_context: _RayContext
    ) -> AsyncIterator[RawMessage]:
        call = self._channel.stream_stream(
            f"/{ASR_SERVICE}/StreamingRecognize", request_serializer=_serialize, response_deserializer=None
        )
        responses = call(request_stream, metadata=self._relayed_metadata(grpc_context))
        try:
            async for data in responses:
                yield RawMessage(data)
        except grpc.aio.AioRpcError as exc:
            raise _relayed_error(exc, grpc_context) from None
        finally:
            responses.cancel()  # the caller went away (or we failed): the replica's stream ends now, not at idle

    # ---- grpc.health.v1.Health: the replica's own health ("", the AsrService, word timestamps) ----

    async def Check(self, request: Any, grpc_context: _RayContext) -> RawMessage:  # noqa: N802
        return await self._unary(f"/{HEALTH_SERVICE}/Check", request, grpc_context)

    # ---- Ray Serve's hooks ----

    async def check_health(self) -> None:
        """Ray restarts a replica whose server stopped serving (its engine died and was not restarted)."""
        check = self._channel.unary_unary(
            f"/{HEALTH_SERVICE}/Check",
            request_serializer=_serialize,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        reply = await check(health_pb2.HealthCheckRequest(service=""), timeout=5.0)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            raise RuntimeError(f"the replica's server is {status}")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray calls this every metrics interval; the custom policy (edge/ray_autoscale.py) reads the figures."""
        load = self._server.live_load()
        return {
            LIVE_STREAMS_METRIC: float(load.live_streams),
            ENGINE_WAITING_METRIC: float(load.engine_waiting_requests),
        }

    def replica_pid(self) -> int:
        """For tests and operators: the process to signal to kill this replica."""
        return self.pid

    async def __del__(self) -> None:
        # Ray calls this on scale-down, upgrade and shutdown, but only once the calls in flight are done (or at
        # graceful_shutdown_timeout_s, when it kills the replica instead): live streams still open here flush
        # their open utterances as finals and end UNAVAILABLE (docs/scale-out.md, "Left").
        await self._server.stop()
        await self._channel.close(grace=None)

    def _relayed_metadata(self, grpc_context: _RayContext) -> tuple[tuple[str, str], ...]:
        grpc_context.set_trailing_metadata([(REPLICA_METADATA, self._replica)])
        return _relayed_metadata(grpc_context)

    async def _unary(self, method: str, request: Any, grpc_context: _RayContext) -> RawMessage:
        call = self._channel.unary_unary(method, request_serializer=_serialize, response_deserializer=None)
        try:
            return RawMessage(await call(request, metadata=self._relayed_metadata(grpc_context)))
        except grpc.aio.AioRpcError as exc:
            raise _relayed_error(exc, grpc_context) from None


def _relayed_metadata(grpc_context: _RayContext) -> tuple[tuple[str, str], ...]:
    # The caller's metadata (x-request-id, authorization) reaches the replica's server as if it had called it.
    return tuple(
        (key, value)
        for key, value in grpc_context.invocation_metadata()
        if key not in _PROXY_METADATA and not key.startswith(":") and not key.startswith("grpc-")
    )


def _relayed_error(exc: grpc.aio.AioRpcError, grpc_context: _RayContext) -> RelayedCallError:
    code = exc.code()
    details = exc.details() or ""
    grpc_context.set_code(code)
    grpc_context.set_details(details)
    return RelayedCallError(f"{code.name}: {details}")


# ---- deploying (these import Ray) ----


@dataclass(frozen=True)
class DeploymentOptions:
    """How the replicas are placed and scaled (the `deployment` section of deploy/ray/serve.yaml)."""

    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Live streams are requests that last: one replica holds up to this many calls at once.
    max_ongoing_requests: int = 256
    autoscaling: Mapping[str, Any] | None = None
    graceful_shutdown_timeout_s: float = 30.0
    health_check_period_s: float = 10.0


def build_app(server_args: Sequence[str], options: DeploymentOptions) -> Any:
    """The Ray Serve application: `AsrReplica` with `server_args` (the flags of `asr-server serve`)."""
    from ray import serve

    actor_options: dict[str, Any] = {"num_cpus": options.num_cpus}
    if options.num_gpus:
        actor_options["num_gpus"] = options.num_gpus
    deployment_options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": actor_options,
        "max_ongoing_requests": options.max_ongoing_requests,
        "graceful_shutdown_timeout_s": options.graceful_shutdown_timeout_s,
        "health_check_period_s": options.health_check_period_s,
    }
    if options.autoscaling:
        deployment_options["autoscaling_config"] = dict(options.autoscaling)
    else:
        deployment_options["num_replicas"] = options.num_replicas
    return serve.deployment(**deployment_options)(AsrReplica).bind(list(server_args))


@dataclass(frozen=True)
class RayServeFile:
    """deploy/ray/serve.yaml, read."""

    grpc_port: int
    server_args: tuple[str, ...]
    deployment: DeploymentOptions
    ray_address: str | None = None
    app_name: str = "asr"


def read_serve_file(path: Path, environ: Mapping[str, str]) -> RayServeFile:
    """Reads and checks the file; its `server_args` are checked here, by the flags' parser, so that a bad flag
    fails the command at once instead of failing every replica Ray starts."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError("expected a mapping at the top")
    unknown = set(raw) - {"grpc_port", "server_args", "deployment", "ray_address", "app_name"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    deployment = raw.get("deployment") or {}
    if not isinstance(deployment, dict):
        raise ValueError("deployment must be a mapping")
    try:
        options = DeploymentOptions(**deployment)
    except TypeError as exc:
        raise ValueError(f"deployment: {exc}") from None
    server_args = tuple(str(arg) for arg in raw.get("server_args") or ())
    parse_serve_config([*server_args, "--host", "127.0.0.1", "--port", "0"], environ)
    address = raw.get("ray_address")
    return RayServeFile(
        grpc_port=int(raw.get("grpc_port", 9000)),
        server_args=server_args,
        deployment=options,
        ray_address=str(address) if address else None,
        app_name=str(raw.get("app_name", "asr")),
    )


def start_serve(serve_file: RayServeFile) -> None:
    """Starts Ray Serve's gRPC proxy on `grpc_port` and deploys the application (Ray must be initialized)."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    grpc_options = gRPCOptions(port=serve_file.grpc_port, grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS))
    serve.start(grpc_options=grpc_options)
    serve.run(
        build_app(serve_file.server_args, serve_file.deployment), name=serve_file.app_name, route_prefix="/"
    )


def serve_from_file(serve_file: RayServeFile) -> None:
    """`asr-server ray serve --config PATH`: deploys, then blocks until SIGTERM or SIGINT, then shuts Serve down
    (each replica drains: AsrReplica.__del__)."""
    import ray
    from ray import serve

    # Inherited by the proxies of a cluster started here; a cluster joined (ray_address) needs them set where its
    # nodes were started (docs/scale-out.md).
    for name, value in ROUTING_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    ray.init(address=serve_file.ray_address)
    start_serve(serve_file)
    print(f"asr-server: Ray Serve gRPC proxy on port {serve_file.grpc_port}", flush=True)
    stop = asyncio.Event()

    async def wait() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

    asyncio.run(wait())
    serve.shutdown()  # type: ignore[no-untyped-call]
