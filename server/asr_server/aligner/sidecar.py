"""The aligner sidecar: `asr-server aligner --model ... --listen unix:///path | host:port`.

Its own process, so it has its own device placement and cannot take the ASR server down with it. The gRPC health
service reports NOT_SERVING until the model is loaded and warmed up, SERVING after, NOT_SERVING from the moment a
shutdown begins. Started by the main server (spawn mode, with --exit-with-parent) or on its own (its own
container, connect mode).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr_server.aligner.batcher import AlignBatcher
from asr_server.aligner.core import MAX_AUDIO_S, AlignerCore, AlignJob, check_job
from asr_server.config import SidecarConfig
from asr_server.errors import AsrError, FailedPrecondition, InvalidInput, LimitExceeded, Unavailable
from asr_server.heap import freeze_startup_heap
from asr_server.languages import ALIGNER_LANGUAGES
from qwenasr.aligner.v1 import aligner_pb2 as pb
from qwenasr.aligner.v1 import aligner_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

ALIGNER_SERVICE = pb.DESCRIPTOR.services_by_name["AlignerService"].full_name
# 300 s of float32 at 16 kHz is 19.2 MB, above gRPC's 4 MB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The main server pings an idle connection to notice a vanished peer (a container gone without a FIN).
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.so_reuseport", 0),
]

_CODES: tuple[tuple[type[AsrError], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


class AlignerServicer(pb_grpc.AlignerServiceServicer):
    def __init__(self, batcher: AlignBatcher, *, model_id: str, max_batch_size: int) -> None:
        self._batcher = batcher
        self._model_id = model_id
        self._max_batch_size = max_batch_size

    async def Align(  # noqa: N802 - gRPC method name
        self, request: pb.AlignRequest, context: grpc.aio.ServicerContext[pb.AlignRequest, pb.AlignResponse]
    ) -> pb.AlignResponse:
        try:
            if len(request.audio_f32le) % 4:
                raise InvalidInput(f"audio_f32le has {len(request.audio_f32le)} bytes, not a multiple of 4")
            # Up to 180 s of audio copied and scanned for NaN: milliseconds that would stall every other call on
            # the event loop.
            job = await asyncio.to_thread(_checked_job, request)
            outcome = await self._batcher.align(job)
        except AsrError as exc:
            code = next((c for kind, c in _CODES if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)
            await context.abort(code, str(exc))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            logger.exception("Align failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"alignment failed: {type(exc).__name__}: {exc}")
        return pb.AlignResponse(
            words=[pb.AlignedWord(text=w.text, start_ms=w.start_ms, end_ms=w.end_ms) for w in outcome.words],
            queue_wait_ms=outcome.queue_wait_ms,
            inference_ms=outcome.inference_ms,
            batch_size=outcome.batch_size,
        )

    async def GetAlignerInfo(  # noqa: N802 - gRPC method name
        self,
        request: pb.GetAlignerInfoRequest,
        context: grpc.aio.ServicerContext[pb.GetAlignerInfoRequest, pb.GetAlignerInfoResponse],
    ) -> pb.GetAlignerInfoResponse:
        core = self._batcher.core
        return pb.GetAlignerInfoResponse(
            model_id=self._model_id,
            languages=[lang.name for lang in ALIGNER_LANGUAGES],
            max_audio_duration_s=MAX_AUDIO_S,
            device=core.device if core is not None else "",
            dtype=core.dtype if core is not None else "",
            max_batch_size=self._max_batch_size,
            pid=os.getpid(),
        )


def _checked_job(request: pb.AlignRequest) -> AlignJob:
    audio = np.frombuffer(request.audio_f32le, dtype="<f4").astype(np.float32)
    job = AlignJob(job_id="", audio_16k=audio, text=request.text, language=request.language)
    check_job(job)
    return job


def unix_socket_path(address: str) -> Path | None:
    """The filesystem path of a unix:// address (unix:///abs/path or unix:rel/path), else None."""
    if address.startswith("unix://"):
        return Path(address[len("unix://") :])
    if address.startswith("unix:"):
        return Path(address[len("unix:") :])
    return None


def _remove_stale_socket(address: str) -> None:
    # A socket file left by a killed predecessor makes bind() fail; anything else at that path is not ours.
    path = unix_socket_path(address)
    if path is None:
        return
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        return


class AlignerSidecar:
    """The sidecar's gRPC server around an AlignBatcher; usable in-process (tests) or as the process's main."""

    def __init__(self, batcher: AlignBatcher, *, listen: str, model_id: str, max_batch_size: int) -> None:
        self.batcher = batcher
        self.listen = listen
        self.health = health_aio.HealthServicer()
        self._servicer = AlignerServicer(batcher, model_id=model_id, max_batch_size=max_batch_size)
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self._stopping = False

    async def start(self, *, load: bool = True) -> None:
        """Opens the address (NOT_SERVING), then loads the model and reports SERVING."""
        server = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_AlignerServiceServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        _remove_stale_socket(self.listen)
        self.port = server.add_insecure_port(self.listen)
        if self.port == 0:
            raise RuntimeError(f"aligner sidecar cannot listen on {self.listen}")
        await server.start()
        self._server = server
        if load:
            await self.load()

    async def load(self, *, freeze_heap: bool = False) -> None:
        """Loads the model; `freeze_heap` (the `asr-server aligner` command, not tests) then freezes the start-up
        heap before health says SERVING (asr_server/heap.py says why)."""
        await self.batcher.start()
        if freeze_heap:
            freeze_startup_heap("aligner sidecar")
        if not self._stopping:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", ALIGNER_SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace_s)
        await self.batcher.stop()
        path = unix_socket_path(self.listen)
        if path is not None:
            _remove_stale_socket(self.listen)


# ---- the `asr-server aligner` command ----


def build_sidecar(config: SidecarConfig) -> AlignerSidecar:
    def load() -> AlignerCore:
        # Runs on the batcher's thread: the thread that owns the device also loads onto it.
        from asr_server.models.devices import resolve_device
        from asr_server.models.loading import load_aligner_model

        if config.load_delay_s:
            time.sleep(config.load_delay_s)
        loaded = load_aligner_model(
            config.model,
            dtype=config.dtype,
            device=resolve_device(config.device),
            attn_implementation=config.attn_implementation,
        )
        return AlignerCore(loaded)

    batcher = AlignBatcher(
        load,
        max_batch_size=config.max_batch_size,
        max_batch_wait_ms=config.max_batch_wait_ms,
        max_queued=config.max_queued_requests,
        batch_delay_ms=config.batch_delay_ms,
    )
    return AlignerSidecar(batcher, listen=config.listen, model_id=config.model, max_batch_size=config.max_batch_size)


async def serve_sidecar(config: SidecarConfig) -> None:
    """Runs until SIGTERM/SIGINT (or, with --exit-with-parent, until the parent is gone)."""
    sidecar = build_sidecar(config)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    watchers: list[asyncio.Task[None]] = []
    if config.exit_with_parent:
        watchers.append(asyncio.create_task(_watch_parent(os.getppid(), stop_requested)))
    await sidecar.start(load=False)
    print(f"asr-server aligner: listening on {config.listen}; loading {config.model}", flush=True)
    load = asyncio.create_task(sidecar.load(freeze_heap=True))
    stop_wait = asyncio.create_task(stop_requested.wait())
    done, _ = await asyncio.wait({load, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    try:
        if load in done:
            load.result()
            print(f"asr-server aligner: serving {config.model} on {config.listen}", flush=True)
            await stop_wait
    finally:
        # Also when the model failed to load: the gRPC server is stopped on this loop, not left to its finalizer.
        await sidecar.stop()
        for task in (load, stop_wait, *watchers):
            task.cancel()


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    # A supervisor killed with SIGKILL cannot stop its child; the child notices it was re-parented.
    while os.getppid() == parent_pid:  # noqa: ASYNC110 - nothing signals re-parenting; it is polled
        await asyncio.sleep(1.0)
    logger.warning("the process that started this aligner (pid %d) is gone; exiting", parent_pid)
    stop.set()
