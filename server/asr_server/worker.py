"""One thread that owns a model, and its async front: the machinery the engine runner and the aligner batcher share.

A `ThreadWorker` loads its core on its own thread (the thread then owns the model and the device), takes jobs from
callers on any event loop through a thread-safe inbox, and settles each caller's asyncio future on that caller's
loop. What to do with the jobs (continuous stepping with aborts, batch-and-run) is its `WorkerBody`'s business; the
worker owns everything around it: the state machine, admission and back-pressure, start and stop, and answering
every caller it admitted even when the body crashes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeAlias, TypeVar

from asr_server.errors import AsrError, LimitExceeded, Unavailable

logger = logging.getLogger(__name__)

State = Literal["new", "starting", "ready", "stopping", "stopped", "failed"]


class Core(Protocol):
    def warmup(self) -> None: ...


CoreT = TypeVar("CoreT", bound=Core)
JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")


def _settle(future: asyncio.Future[ResultT], value: ResultT | BaseException) -> None:
    # Runs on the caller's loop; a caller that went away meanwhile wants nothing.
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


@dataclass(frozen=True, eq=False)
class Ticket(Generic[JobT, ResultT]):
    """One admitted job and the caller waiting for it. Once in the inbox, only the worker's thread touches it."""

    job: JobT
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[ResultT]
    enqueued_s: float  # time.monotonic() at admission

    @property
    def abandoned(self) -> bool:
        """The caller is gone (cancelled) or already answered: work for it would be wasted."""
        return self.future.done()

    def settle(self, value: ResultT | BaseException) -> None:
        """Answers the caller (thread-safe); an exception is raised in the caller. A second answer is ignored."""
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, value)
        except RuntimeError:
            if not self.loop.is_closed():
                raise
            # The caller's loop is gone (a test's loop, a server shut down): nobody can receive this answer, and
            # the worker must go on serving the others.
            logger.debug("a caller's event loop closed before its answer came")


@dataclass(frozen=True, eq=False)
class Withdrawn(Generic[JobT, ResultT]):
    """The caller of `ticket` was cancelled; a body that already holds the job may drop it."""

    ticket: Ticket[JobT, ResultT]


class Stop:
    """Told to stop: the body returns; whatever it and the inbox still hold is answered Unavailable."""


STOP = Stop()

Message: TypeAlias = Ticket[JobT, ResultT] | Withdrawn[JobT, ResultT] | Stop


class Inbox(Generic[JobT, ResultT]):
    """The thread-safe queue from the callers to the worker's thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Message[JobT, ResultT]] = queue.SimpleQueue()

    def put(self, message: Message[JobT, ResultT]) -> None:
        self._queue.put(message)

    def get(self, timeout_s: float | None = None) -> Message[JobT, ResultT] | None:
        """The next message: waits forever (None), up to timeout_s, or not at all (<= 0); None when none came.
        A ticket whose caller is already gone is skipped: its job never reaches the body."""
        deadline_s = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                if deadline_s is None:
                    message = self._queue.get()
                else:
                    remaining_s = deadline_s - time.monotonic()
                    message = self._queue.get(timeout=remaining_s) if remaining_s > 0 else self._queue.get_nowait()
            except queue.Empty:
                return None
            if not (isinstance(message, Ticket) and message.abandoned):
                return message


class WorkerBody(ABC, Generic[CoreT, JobT, ResultT]):
    """What a worker's thread does with its jobs. Both methods run on the worker's thread only."""

    @abstractmethod
    def serve(self, core: CoreT, inbox: Inbox[JobT, ResultT]) -> None:
        """Takes tickets from the inbox and settles each, until it gets STOP: then returns. Raising is a crash: the
        worker refuses new callers and answers everyone admitted."""

    @abstractmethod
    def finish(self, core: CoreT, error: Unavailable) -> None:
        """Once serve has returned or raised: settles every ticket the body still holds with `error` and releases
        the core."""


@dataclass(frozen=True)
class WorkerTexts:
    """What callers and the log are told. `noun` names the worker ("engine": "engine already ready")."""

    noun: str
    queue_full: str  # format fields: {waiting} (callers in flight), {limit}
    not_ready: str  # format field: {state}
    shutting_down: str
    crashed: str


class ThreadWorker(Generic[CoreT, JobT, ResultT]):
    def __init__(
        self,
        core_factory: Callable[[], CoreT],
        body: WorkerBody[CoreT, JobT, ResultT],
        *,
        name: str,
        texts: WorkerTexts,
        max_queued: int,
        warmup: bool = True,
    ) -> None:
        self._core_factory = core_factory
        self._body = body
        self._name = name
        self._texts = texts
        self._max_queued = max_queued
        self._warmup = warmup
        self._inbox: Inbox[JobT, ResultT] = Inbox()
        self._thread: threading.Thread | None = None
        self._in_flight = 0  # caller side only (one event loop)
        self._state: State = "new"
        # Held by submit() from its state check to its put, and by the thread when it leaves: a job is either
        # refused or queued before the thread's last drain of the inbox, never left behind unanswered.
        self._admission = threading.Lock()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._core: CoreT | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def core(self) -> CoreT | None:
        """The loaded core, None until the thread has loaded it (or when loading failed)."""
        return self._core

    @property
    def in_flight(self) -> int:
        """Callers admitted and not yet answered (queued or being worked on)."""
        return self._in_flight

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    async def start(self) -> None:
        """Starts the thread, which loads the core and warms it up; returns when it is ready."""
        noun = self._texts.noun
        if self._state != "new":
            raise RuntimeError(f"{noun} already {self._state}")
        self._state = "starting"
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._ready.wait)
        if self._failure is not None:
            self._state = "failed"
            raise RuntimeError(f"{noun} failed to start: {self._failure}") from self._failure
        with self._admission:
            # Only from "starting": a stop() during the load, or a thread that died since, must not read as ready.
            # (Read through the property: the thread may have changed it since the check above.)
            died = self.state == "failed"
            if self.state == "starting":
                self._state = "ready"
        if died:
            raise RuntimeError(f"the {noun} thread failed right after loading; see the log")

    async def stop(self) -> None:
        """Stops the thread; callers still queued get Unavailable."""
        if self._thread is None or self._state in ("stopped", "stopping"):
            return
        self._state = "stopping"
        self._inbox.put(STOP)
        await asyncio.to_thread(self._thread.join)
        self._state = "stopped"

    async def submit(self, job: JobT) -> ResultT:
        """Queues `job` for the thread and waits for its result. Cancelling the caller withdraws the job."""
        if self._in_flight >= self._max_queued:
            raise LimitExceeded(
                self._texts.queue_full.format(waiting=self._in_flight, limit=self._max_queued), retryable=True
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ResultT] = loop.create_future()
        ticket = Ticket(job, loop, future, time.monotonic())
        with self._admission:
            if self._state != "ready":
                raise Unavailable(self._texts.not_ready.format(state=self._state))
            self._inbox.put(ticket)
        self._in_flight += 1
        try:
            return await future
        except asyncio.CancelledError:
            self._inbox.put(Withdrawn(ticket))
            raise
        finally:
            self._in_flight -= 1

    # ---- the worker's thread ----

    def _run(self) -> None:
        try:
            core = self._core_factory()
            if self._warmup:
                core.warmup()
            self._core = core
        except BaseException as exc:  # noqa: BLE001 - reported to start() and re-raised there
            if isinstance(exc, AsrError):
                # A configuration problem (no such model, not a checkpoint, no CUDA): its message says it all and
                # start() raises it for the CLI to print as one line; the traceback only at debug level.
                logger.debug("%s failed to start", self._texts.noun, exc_info=exc)
            else:
                logger.exception("%s failed to start", self._texts.noun)
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        error = Unavailable(self._texts.shutting_down)
        try:
            self._body.serve(core, self._inbox)
        except BaseException:  # noqa: BLE001 - logged; callers are answered below and new ones refused
            logger.exception("the %s thread failed; refusing new requests", self._texts.noun)
            error = Unavailable(self._texts.crashed)
        finally:
            with self._admission:
                if self._state not in ("stopping", "stopped"):
                    # Left without being told to stop: a crash. Callers must not queue for a thread that is gone.
                    self._state = "failed"
            # No caller can be admitted any more: this drain is the last, and the body answers what it holds.
            self._fail_queued(error)
            self._body.finish(core, error)

    def _fail_queued(self, error: Unavailable) -> None:
        while (message := self._inbox.get(0)) is not None:
            if isinstance(message, Ticket):
                message.settle(error)
