"""The engine thread and its async front.

One thread owns the model and the device (asr_server.worker). RPC handlers call `await runner.decode(request)`: the
request goes into a thread-safe inbox, the thread forms batches across all callers (up to max_batch_size, waiting at
most max_batch_wait_ms for a partial batch to fill), steps the core and resolves each caller's asyncio future on that
caller's loop. A cancelled caller's request is aborted at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from asr_server.engine.core import EngineCore, EngineOutput
from asr_server.engine.types import DecodeRequest, DecodeResult, WorkItem
from asr_server.errors import Unavailable
from asr_server.worker import Inbox, State, Stop, ThreadWorker, Ticket, WorkerBody, WorkerTexts

logger = logging.getLogger(__name__)

# A step that could start nothing while nothing runs (the waiting requests' features are still being computed on
# the core's preprocess threads): the thread waits this long for the inbox before stepping again, instead of
# spinning on step() and holding the GIL those threads need.
_NOTHING_READY_WAIT_S = 0.001

_TEXTS = WorkerTexts(
    noun="engine",
    queue_full=(
        "the engine queue is full ({waiting} pieces of audio waiting, limit {limit}); retry with exponential backoff"
    ),
    not_ready="the engine is {state}; retry on another replica or later",
    shutting_down="the server is shutting down; retry on another replica",
    crashed="the engine failed; retry on another replica",
)


@dataclass(frozen=True)
class BatchingPolicy:
    max_batch_size: int
    max_batch_wait_ms: float
    max_queued_requests: int


def _outcome(output: EngineOutput) -> DecodeResult | Exception:
    if output.error is not None:
        return output.error
    if output.result is not None:
        return output.result
    return RuntimeError(f"engine returned nothing for {output.request_id}")


class _Stepper(WorkerBody[EngineCore, WorkItem, DecodeResult]):
    """Feeds the core what arrives, steps it while it holds work, and fans its outputs out to the callers."""

    def __init__(self, policy: BatchingPolicy) -> None:
        self._policy = policy
        self._pending: dict[str, Ticket[WorkItem, DecodeResult]] = {}

    def serve(self, core: EngineCore, inbox: Inbox[WorkItem, DecodeResult]) -> None:
        max_wait_s = self._policy.max_batch_wait_ms / 1000.0
        while True:
            idle = core.num_waiting() == 0 and core.num_running() == 0
            if self._drain(core, inbox, block=idle, timeout_s=None):
                return
            # A partial batch waits a moment for company, but only while nothing is running:
            # with work in progress, newcomers join at the next step anyway.
            if core.num_running() == 0 and 0 < core.num_waiting() < self._policy.max_batch_size:
                oldest = core.oldest_waiting_monotonic_s()
                deadline = (oldest if oldest is not None else time.monotonic()) + max_wait_s
                while core.num_waiting() < self._policy.max_batch_size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    if self._drain(core, inbox, block=True, timeout_s=remaining):
                        return
            if core.num_waiting() == 0 and core.num_running() == 0:
                continue
            try:
                outputs = core.step()
            except Exception as exc:  # noqa: BLE001 - a core bug must not kill the thread; callers are told
                logger.exception("engine step failed")
                # Only what the core holds is suspect; the inbox (new requests, aborts, a stop) is handled as usual.
                self._fail_pending(core, exc)
                continue
            for output in outputs:
                ticket = self._pending.pop(output.request_id, None)
                if ticket is not None:
                    ticket.settle(_outcome(output))
            if not outputs and core.num_running() == 0 and core.num_waiting():
                if self._drain(core, inbox, block=True, timeout_s=_NOTHING_READY_WAIT_S):
                    return

    def finish(self, core: EngineCore, error: Unavailable) -> None:
        self._fail_pending(core, error)
        core.close()

    def _drain(
        self, core: EngineCore, inbox: Inbox[WorkItem, DecodeResult], *, block: bool, timeout_s: float | None
    ) -> bool:
        """Moves messages from the inbox into the core. Returns True when told to stop."""
        first = True
        while True:
            message = inbox.get(timeout_s if first and block else 0)
            if message is None:
                return False
            first = False
            if isinstance(message, Stop):
                return True
            if isinstance(message, Ticket):  # (one cancelled before the engine saw it never gets here)
                self._pending[message.job.request.request_id] = message
                core.add(message.job)
            else:
                request_id = message.ticket.job.request.request_id
                if self._pending.get(request_id) is message.ticket:
                    del self._pending[request_id]
                    core.abort(request_id)

    def _fail_pending(self, core: EngineCore, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for request_id, ticket in pending.items():
            core.abort(request_id)
            ticket.settle(error)


class EngineRunner:
    def __init__(
        self,
        core_factory: Callable[[], EngineCore],
        policy: BatchingPolicy,
        *,
        name: str = "engine",
        warmup: bool = True,
    ) -> None:
        self._worker: ThreadWorker[EngineCore, WorkItem, DecodeResult] = ThreadWorker(
            core_factory,
            _Stepper(policy),
            name=name,
            texts=_TEXTS,
            max_queued=policy.max_queued_requests,
            warmup=warmup,
        )

    @property
    def state(self) -> State:
        return self._worker.state

    @property
    def core(self) -> EngineCore | None:
        """The loaded core, None until the engine thread has loaded it."""
        return self._worker.core

    @property
    def model_id(self) -> str:
        core = self._worker.core
        return core.model_id if core is not None else ""

    @property
    def in_flight(self) -> int:
        return self._worker.in_flight

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """The replica interface (replicas.py). In-process, readiness changes only at start and stop, which the
        server drives itself: there is nothing to report, and `listener` is never called."""

    async def start(self) -> None:
        """Starts the thread, which loads the model and warms it up; returns when it is ready."""
        await self._worker.start()

    async def stop(self) -> None:
        """Stops the thread; requests still queued get UNAVAILABLE."""
        await self._worker.stop()

    async def decode(self, request: DecodeRequest) -> DecodeResult:
        item = WorkItem(request=request, enqueued_ns=time.time_ns(), enqueued_monotonic_s=time.monotonic())
        return await self._worker.submit(item)
