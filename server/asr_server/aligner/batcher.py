"""The aligner's own thread, queue and dynamic batcher.

The same pattern as the ASR engine (engine/runner.py), specialised to a core that runs one forward pass per batch:
one thread owns the model and the device; callers `await batcher.align(job)` from any event loop; the thread takes
what is queued, waits at most max_batch_wait_ms for a partial batch to fill, runs it, and resolves each caller's
future on that caller's loop. A caller cancelled while queued is skipped; one cancelled mid-batch is ignored
when the batch ends.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from asr_server.aligner.core import AlignerCore, AlignJob
from asr_server.errors import LimitExceeded, Unavailable
from asr_server.results import Word

logger = logging.getLogger(__name__)

State = Literal["new", "starting", "ready", "stopping", "stopped", "failed"]


@dataclass(frozen=True)
class AlignOutcome:
    words: tuple[Word, ...]
    queue_wait_ms: float
    inference_ms: float
    batch_size: int


@dataclass(frozen=True)
class _Pending:
    job: AlignJob
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[AlignOutcome]
    enqueued_s: float


_STOP = object()


def _settle(future: asyncio.Future[AlignOutcome], value: AlignOutcome | BaseException) -> None:
    # Runs on the caller's loop; a caller that went away meanwhile wants nothing.
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


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
        self._core_factory = core_factory
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_batch_wait_ms / 1000.0
        self._max_queued = max_queued
        # Tests only: a pause before each batch, so that a request can be caught in flight.
        self._batch_delay_s = batch_delay_ms / 1000.0
        self._inbox: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._state: State = "new"
        # Held by align() from its state check to its put, and by the thread when it leaves: a job is either
        # refused or queued before the thread's last drain of the inbox, never left behind unanswered.
        self._admission = threading.Lock()
        self._queued = 0  # caller side (one event loop)
        self.core: AlignerCore | None = None

    @property
    def state(self) -> State:
        return self._state

    async def start(self) -> None:
        """Loads the model on the batcher's thread and warms it up; returns when it is ready."""
        if self._state != "new":
            raise RuntimeError(f"aligner already {self._state}")
        self._state = "starting"
        self._thread = threading.Thread(target=self._run, name="aligner", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._ready.wait)
        if self._failure is not None:
            self._state = "failed"
            raise RuntimeError(f"aligner failed to start: {self._failure}") from self._failure
        with self._admission:
            died = self.state == "failed"
            if self.state == "starting":
                self._state = "ready"
        if died:
            raise RuntimeError("the aligner thread failed right after loading; see the log")

    async def stop(self) -> None:
        if self._thread is None or self._state in ("stopping", "stopped"):
            return
        self._state = "stopping"
        self._inbox.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._state = "stopped"

    async def align(self, job: AlignJob) -> AlignOutcome:
        if self._queued >= self._max_queued:
            raise LimitExceeded(
                f"the aligner queue is full ({self._queued} requests); retry with backoff", retryable=True
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AlignOutcome] = loop.create_future()
        with self._admission:
            if self._state != "ready":
                raise Unavailable(f"the aligner is {self._state}")
            self._inbox.put(_Pending(job, loop, future, time.monotonic()))
        self._queued += 1
        try:
            return await future
        finally:
            self._queued -= 1

    # ---- the batcher's thread ----

    def _run(self) -> None:
        try:
            core = self._core_factory()
            core.warmup()
            self.core = core
        except BaseException as exc:  # noqa: BLE001 - reported to start() and raised there
            logger.exception("aligner failed to load")
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        error = Unavailable("the aligner is shutting down; retry")
        try:
            self._loop(core)
        except BaseException:  # noqa: BLE001 - logged; callers are answered below and new ones refused
            logger.exception("the aligner thread failed; refusing new requests")
            error = Unavailable("the aligner failed; retry")
        finally:
            with self._admission:
                if self._state not in ("stopping", "stopped"):
                    # Left without being told to stop: a crash. Callers must not queue for a thread that is gone.
                    self._state = "failed"
            self._fail_queued(error)

    def _loop(self, core: AlignerCore) -> None:
        waiting: list[_Pending] = []
        while True:
            if not waiting:
                item = self._inbox.get()
                if item is _STOP:
                    return
                if isinstance(item, _Pending):
                    waiting.append(item)
            deadline = waiting[0].enqueued_s + self._max_wait_s
            while len(waiting) < self._max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    item = self._inbox.get(timeout=remaining) if remaining > 0 else self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._fail(waiting, Unavailable("the aligner is shutting down; retry"))
                    return
                if isinstance(item, _Pending):
                    waiting.append(item)
            live = [p for p in waiting if not p.future.done()]
            batch, waiting = live[: self._max_batch_size], live[self._max_batch_size :]
            if batch:
                self._run_batch(core, batch)

    def _run_batch(self, core: AlignerCore, batch: list[_Pending]) -> None:
        if self._batch_delay_s:
            time.sleep(self._batch_delay_s)
        started = time.monotonic()
        try:
            outcomes = core.align_batch([p.job for p in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"the aligner core answered {len(outcomes)} of {len(batch)} jobs")
        except Exception as exc:  # noqa: BLE001 - the batch's callers are told; the thread goes on
            logger.exception("aligner batch of %d failed", len(batch))
            error = RuntimeError(f"alignment failed: {type(exc).__name__}: {exc}")
            self._fail(batch, error)
            return
        inference_ms = (time.monotonic() - started) * 1000
        for pending, outcome in zip(batch, outcomes, strict=True):
            value: AlignOutcome | BaseException
            if isinstance(outcome, Exception):
                value = outcome
            else:
                value = AlignOutcome(
                    words=outcome,
                    queue_wait_ms=max(0.0, (started - pending.enqueued_s) * 1000),
                    inference_ms=inference_ms,
                    batch_size=len(batch),
                )
            pending.loop.call_soon_threadsafe(_settle, pending.future, value)

    @staticmethod
    def _fail(pending: list[_Pending], error: BaseException) -> None:
        for p in pending:
            p.loop.call_soon_threadsafe(_settle, p.future, error)

    def _fail_queued(self, error: BaseException) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Pending):
                item.loop.call_soon_threadsafe(_settle, item.future, error)
