"""The main server's side of the sidecar: an AlignBackend over gRPC, with readiness and deadlines.

Readiness comes from the sidecar's own health service, polled on the channel (and, in spawn mode, dropped at once
by the supervisor when the process exits). Every call has a deadline, and a request that arrives while the sidecar
is down waits for it only a bounded time, so no request hangs: whatever goes wrong on the way to the sidecar ends
as Unavailable (UNAVAILABLE, retryable) for the requests it touched and for no others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr_server.aligner.sidecar import MAX_MESSAGE_BYTES
from asr_server.errors import FailedPrecondition, InvalidInput, LimitExceeded, Unavailable
from asr_server.results import Word
from asr_server.transcription import AlignmentResult
from qwenasr.aligner.v1 import aligner_pb2 as pb
from qwenasr.aligner.v1 import aligner_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # gRPC's default reconnect backoff grows to 120 s: a restarted sidecar would stay unreachable that long.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # A TCP peer that vanishes without closing (its container gone) is noticed by pings, not only by deadlines.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

_LOST = "the forced-aligner sidecar went down while aligning this request (it is being restarted); retry"


class SidecarClient:
    """Aligns through a sidecar at `address` (unix:///path or host:port)."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float,
        ready_wait_s: float,
        poll_interval_s: float = 0.5,
        describe_down: Callable[[], str] | None = None,
    ) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._ready_wait_s = ready_wait_s
        self._poll_interval_s = poll_interval_s
        self._describe_down = describe_down
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.AlignerServiceAsyncStub | None = None
        self._poller: asyncio.Task[None] | None = None
        self._ready = False
        self._ready_event = asyncio.Event()
        self._listeners: list[Callable[[bool], None]] = []
        self._in_flight: set[grpc.aio.UnaryUnaryCall[pb.AlignRequest, pb.AlignResponse]] = set()
        self._lost: set[grpc.aio.UnaryUnaryCall[pb.AlignRequest, pb.AlignResponse]] = set()

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def in_flight(self) -> int:
        """Alignments sent to the sidecar and not yet answered."""
        return len(self._in_flight)

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """`listener(ready)` runs on every change of readiness."""
        self._listeners.append(listener)

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.AlignerServiceStub(self._channel)
        self._poller = asyncio.create_task(self._poll(health_pb2_grpc.HealthStub(self._channel)))

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        self._set_ready(False)
        if self._channel is not None:
            await self._channel.close(None)

    def sidecar_down(self) -> None:
        """The sidecar is known to be gone (its process exited): not ready, and its in-flight calls are lost."""
        self._set_ready(False)
        for call in list(self._in_flight):
            self._lost.add(call)
            call.cancel()

    def _set_ready(self, ready: bool) -> None:
        if ready == self._ready:
            return
        self._ready = ready
        if ready:
            self._ready_event.set()
        else:
            self._ready_event.clear()
        logger.info("forced aligner at %s is %s", self.address, "ready" if ready else "not ready")
        for listener in self._listeners:
            listener(ready)

    async def _poll(self, health_stub: health_pb2_grpc.HealthStub) -> None:
        request = health_pb2.HealthCheckRequest(service="")
        while True:
            try:
                response = await health_stub.Check(request, timeout=max(1.0, self._poll_interval_s))
                self._set_ready(response.status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.aio.AioRpcError:
                self._set_ready(False)
            await asyncio.sleep(self._poll_interval_s)

    async def align(self, audio_16k: npt.NDArray[np.float32], text: str, language: str) -> AlignmentResult:
        started = time.perf_counter()
        if self._stub is None:
            raise Unavailable("the forced aligner is not started")
        if not self._ready:
            try:
                await asyncio.wait_for(self._ready_event.wait(), timeout=self._ready_wait_s)
            except TimeoutError:
                state = self._describe_down() if self._describe_down is not None else "not answering"
                raise Unavailable(
                    f"the forced aligner is not ready ({state}); waited {self._ready_wait_s:.0f} s; "
                    "retry, or ask without word timestamps"
                ) from None
        remaining = max(0.1, self._timeout_s - (time.perf_counter() - started))
        request = pb.AlignRequest(
            audio_f32le=np.ascontiguousarray(audio_16k, dtype="<f4").tobytes(), text=text, language=language
        )
        call = self._stub.Align(request, timeout=remaining)
        self._in_flight.add(call)
        try:
            response = await call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if call in self._lost and (task is None or task.cancelling() == 0):
                raise Unavailable(_LOST) from None
            raise
        except grpc.aio.AioRpcError as exc:
            raise _error_for(exc, self._timeout_s) from exc
        finally:
            self._in_flight.discard(call)
            self._lost.discard(call)
        words = tuple(Word(w.text, w.start_ms, w.end_ms) for w in response.words)
        return AlignmentResult(words=words, alignment_ms=(time.perf_counter() - started) * 1000)

    async def info(self) -> pb.GetAlignerInfoResponse:
        if self._stub is None:
            raise Unavailable("the forced aligner is not started")
        return await self._stub.GetAlignerInfo(pb.GetAlignerInfoRequest(), timeout=5.0)


def _error_for(exc: grpc.aio.AioRpcError, timeout_s: float) -> Exception:
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return LimitExceeded(f"forced aligner: {details}", retryable=True)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(f"forced aligner: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"the forced aligner did not answer within {timeout_s:.0f} s; retry")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
        # UNKNOWN: a connection torn down mid-call is reported so by some gRPC versions.
        return Unavailable(f"{_LOST} ({code.name}: {details})")
    return RuntimeError(f"forced aligner failed: {code.name}: {details}")
