"""The engine thread and its async front.

One thread owns the model and the device. RPC handlers call `await runner.decode(request)`: the request goes
into a thread-safe inbox, the thread forms batches across all callers (up to max_batch_size, waiting at most
max_batch_wait_ms for a partial batch to fill), and results come back through one fan-out that resolves each
caller's asyncio future on that caller's loop. A cancelled caller's request is aborted at once.
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

from asr_server.engine.core import EngineCore, EngineOutput
from asr_server.engine.types import DecodeRequest, DecodeResult, WorkItem
from asr_server.errors import LimitExceeded, Unavailable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingPolicy:
    max_batch_size: int
    max_batch_wait_ms: float
    max_queued_requests: int


@dataclass(frozen=True)
class _Add:
    item: WorkItem
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[DecodeResult]


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Stop:
    pass


_Command = _Add | _Abort | _Stop
State = Literal["new", "starting", "ready", "stopping", "stopped", "failed"]


def _resolve(future: asyncio.Future[DecodeResult], output: EngineOutput) -> None:
    # Runs on the caller's loop. The caller may have been cancelled meanwhile: then nobody wants it.
    if future.done():
        return
    if output.error is not None:
        future.set_exception(output.error)
    elif output.result is not None:
        future.set_result(output.result)
    else:
        future.set_exception(RuntimeError(f"engine returned nothing for {output.request_id}"))


class EngineRunner:
    def __init__(
        self,
        core_factory: Callable[[], EngineCore],
        policy: BatchingPolicy,
        *,
        name: str = "engine",
        warmup: bool = True,
    ) -> None:
        self._core_factory = core_factory
        self._policy = policy
        self._name = name
        self._warmup = warmup
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending: dict[str, _Add] = {}  # engine thread only
        self._in_flight = 0  # caller side only (one event loop)
        self._state: State = "new"
        # Held by decode() from its state check to its put, and by the engine thread when it leaves: a request
        # is either refused or queued before the thread's last drain of the inbox, never left behind unanswered.
        self._admission = threading.Lock()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._core: EngineCore | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def model_id(self) -> str:
        return self._core.model_id if self._core is not None else ""

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def start(self) -> None:
        """Starts the thread, which loads the model and warms it up; returns when it is ready."""
        if self._state != "new":
            raise RuntimeError(f"engine already {self._state}")
        self._state = "starting"
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._ready.wait)
        if self._failure is not None:
            self._state = "failed"
            raise RuntimeError(f"engine failed to start: {self._failure}") from self._failure
        with self._admission:
            # Only from "starting": a stop() during the load, or a thread that died since, must not read as ready.
            died = self.state == "failed"
            if self.state == "starting":
                self._state = "ready"
        if died:
            raise RuntimeError("the engine thread failed right after loading; see the log")

    async def stop(self) -> None:
        """Stops the thread; requests still queued get UNAVAILABLE."""
        if self._thread is None or self._state in ("stopped", "stopping"):
            return
        self._state = "stopping"
        self._inbox.put(_Stop())
        await asyncio.to_thread(self._thread.join)
        self._state = "stopped"

    async def decode(self, request: DecodeRequest) -> DecodeResult:
        if self._in_flight >= self._policy.max_queued_requests:
            raise LimitExceeded(
                f"the engine queue is full ({self._in_flight} pieces of audio waiting, limit "
                f"{self._policy.max_queued_requests}); retry with exponential backoff",
                retryable=True,
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[DecodeResult] = loop.create_future()
        item = WorkItem(request=request, enqueued_ns=time.time_ns(), enqueued_monotonic_s=time.monotonic())
        with self._admission:
            if self._state != "ready":
                raise Unavailable(f"the engine is {self._state}; retry on another replica or later")
            self._inbox.put(_Add(item, loop, future))
        self._in_flight += 1
        try:
            return await future
        except asyncio.CancelledError:
            self._inbox.put(_Abort(request.request_id))
            raise
        finally:
            self._in_flight -= 1

    # ---- engine thread ----

    def _run(self) -> None:
        try:
            core = self._core_factory()
            if self._warmup:
                core.warmup()
            self._core = core
        except BaseException as exc:  # noqa: BLE001 - reported to start() and re-raised there
            logger.exception("engine failed to start")
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        error = Unavailable("the server is shutting down; retry on another replica")
        try:
            self._loop(core)
        except BaseException:  # noqa: BLE001 - logged; callers are answered below and new ones refused
            logger.exception("the engine thread failed; refusing new requests")
            error = Unavailable("the engine failed; retry on another replica")
        finally:
            with self._admission:
                if self._state not in ("stopping", "stopped"):
                    # Left without being told to stop: a crash. Callers must not queue for a thread that is gone.
                    self._state = "failed"
            self._fail_pending(core, error)
            self._fail_queued(error)
            core.close()

    def _loop(self, core: EngineCore) -> None:
        max_wait_s = self._policy.max_batch_wait_ms / 1000.0
        while True:
            idle = core.num_waiting() == 0 and core.num_running() == 0
            if self._drain(core, block=idle, timeout_s=None):
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
                    if self._drain(core, block=True, timeout_s=remaining):
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
                pending = self._pending.pop(output.request_id, None)
                if pending is not None:
                    pending.loop.call_soon_threadsafe(_resolve, pending.future, output)

    def _drain(self, core: EngineCore, *, block: bool, timeout_s: float | None) -> bool:
        """Moves commands from the inbox into the core. Returns True when told to stop."""
        first = True
        while True:
            try:
                if first and block:
                    command = self._inbox.get(timeout=timeout_s)
                else:
                    command = self._inbox.get_nowait()
            except queue.Empty:
                return False
            first = False
            if isinstance(command, _Stop):
                return True
            if isinstance(command, _Abort):
                if self._pending.pop(command.request_id, None) is not None:
                    core.abort(command.request_id)
                continue
            if command.future.done():  # cancelled before the engine saw it
                continue
            self._pending[command.item.request.request_id] = command
            core.add(command.item)

    def _fail_pending(self, core: EngineCore, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for request_id, add in pending.items():
            core.abort(request_id)
            add.loop.call_soon_threadsafe(_resolve, add.future, EngineOutput(request_id, error=error))

    def _fail_queued(self, error: Exception) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                command.loop.call_soon_threadsafe(
                    _resolve, command.future, EngineOutput(command.item.request.request_id, error=error)
                )
