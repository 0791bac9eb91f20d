"""The aligner's own thread, queue and dynamic batcher.

The shared thread machinery (asr_server.worker) with a body for a core that runs one forward pass per batch: one
thread owns the model and the device; callers `await batcher.align(job)` from any event loop; the thread takes
what is queued, waits at most max_batch_wait_ms for a partial batch to fill, runs it, and resolves each caller's
future on that caller's loop. A caller cancelled while queued is skipped; one cancelled mid-batch is ignored
when the batch ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from asr_server.aligner.core import AlignerCore, AlignJob
from asr_server.errors import Unavailable
from asr_server.results import Word
from asr_server.worker import Inbox, State, Stop, ThreadWorker, Ticket, WorkerBody, WorkerTexts

logger = logging.getLogger(__name__)

_TEXTS = WorkerTexts(
    noun="aligner",
    queue_full="the aligner queue is full ({waiting} requests); retry with backoff",
    not_ready="the aligner is {state}",
    shutting_down="the aligner is shutting down; retry",
    crashed="the aligner failed; retry",
)


@dataclass(frozen=True)
class AlignOutcome:
    words: tuple[Word, ...]
    queue_wait_ms: float
    inference_ms: float
    batch_size: int


_AlignTicket = Ticket[AlignJob, AlignOutcome]


class _Batches(WorkerBody[AlignerCore, AlignJob, AlignOutcome]):
    """Gathers queued jobs into batches and runs each through the core in one call."""

    def __init__(self, *, max_batch_size: int, max_batch_wait_ms: float, batch_delay_ms: float) -> None:
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_batch_wait_ms / 1000.0
        # Tests only: a pause before each batch, so that a request can be caught in flight.
        self._batch_delay_s = batch_delay_ms / 1000.0
        self._waiting: list[_AlignTicket] = []
        self._running: list[_AlignTicket] = []

    def serve(self, core: AlignerCore, inbox: Inbox[AlignJob, AlignOutcome]) -> None:
        while self._gather(inbox):
            live = [t for t in self._waiting if not t.abandoned]
            self._running, self._waiting = live[: self._max_batch_size], live[self._max_batch_size :]
            if self._running:
                self._run_batch(core, self._running)
            self._running = []

    def finish(self, core: AlignerCore, error: Unavailable) -> None:
        held, self._waiting, self._running = self._running + self._waiting, [], []
        for ticket in held:
            ticket.settle(error)

    def _gather(self, inbox: Inbox[AlignJob, AlignOutcome]) -> bool:
        """Waits for a first job, then until max_batch_wait_ms after it for a batch to fill. False when told to stop."""
        while not self._waiting:
            message = inbox.get()
            if isinstance(message, Stop):
                return False
            if isinstance(message, Ticket):
                self._waiting.append(message)
        deadline = self._waiting[0].enqueued_s + self._max_wait_s
        while len(self._waiting) < self._max_batch_size:
            message = inbox.get(deadline - time.monotonic())
            if message is None:
                break
            if isinstance(message, Stop):
                return False
            if isinstance(message, Ticket):
                self._waiting.append(message)
        return True

    def _run_batch(self, core: AlignerCore, batch: list[_AlignTicket]) -> None:
        if self._batch_delay_s:
            time.sleep(self._batch_delay_s)
        started = time.monotonic()
        try:
            outcomes = core.align_batch([t.job for t in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"the aligner core answered {len(outcomes)} of {len(batch)} jobs")
        except Exception as exc:  # noqa: BLE001 - the batch's callers are told; the thread goes on
            logger.exception("aligner batch of %d failed", len(batch))
            error = RuntimeError(f"alignment failed: {type(exc).__name__}: {exc}")
            for ticket in batch:
                ticket.settle(error)
            return
        inference_ms = (time.monotonic() - started) * 1000
        for ticket, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                ticket.settle(outcome)
            else:
                ticket.settle(
                    AlignOutcome(
                        words=outcome,
                        queue_wait_ms=max(0.0, (started - ticket.enqueued_s) * 1000),
                        inference_ms=inference_ms,
                        batch_size=len(batch),
                    )
                )


class AlignBatcher:
    def __init__(
        self,
        core_factory: Callable[[], AlignerCore],
        *,
        max_batch_size: int,
        max_batch_wait_ms: float,
        max_queued: int = 1024,
        batch_delay_ms: float = 0.0,
    ) -> None:
        self._worker: ThreadWorker[AlignerCore, AlignJob, AlignOutcome] = ThreadWorker(
            core_factory,
            _Batches(max_batch_size=max_batch_size, max_batch_wait_ms=max_batch_wait_ms, batch_delay_ms=batch_delay_ms),
            name="aligner",
            texts=_TEXTS,
            max_queued=max_queued,
        )

    @property
    def state(self) -> State:
        return self._worker.state

    @property
    def core(self) -> AlignerCore | None:
        return self._worker.core

    async def start(self) -> None:
        """Loads the model on the batcher's thread and warms it up; returns when it is ready."""
        await self._worker.start()

    async def stop(self) -> None:
        await self._worker.stop()

    async def align(self, job: AlignJob) -> AlignOutcome:
        return await self._worker.submit(job)
