"""The front's side of an engine process: the same interface as an EngineRunner (state, model_id, in_flight,
start, stop, decode), with the core in a child process it supervises.

One `EngineProcess` per replica device. It binds a ZeroMQ DEALER socket on a unix (ipc) path of its own, spawns the
child (multiprocessing "spawn": a fresh interpreter, never a fork of a process that holds torch or gRPC threads),
which connects to it, loads the core and reports Ready. Each decode() sends a Submit and awaits the Result or
Failure with its request id; a cancelled caller sends an Abort at once.

Faults: the child's exit is seen at once (its process sentinel is watched on the event loop), every request it
held fails Unavailable (UNAVAILABLE with RetryInfo at the edge), the state leaves "ready" (listeners: the server's
health goes NOT_SERVING) and the child is started again after a backoff that doubles from 0.5 s to 30 s (back to
0.5 s once a child stayed up a minute). Every generation gets a fresh socket path, so nothing sent to a dead child
reaches its successor. Only a first start that fails is not retried: the server then fails to start, as in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

import zmq
import zmq.asyncio

from asr_server.config import Config
from asr_server.engine.core import CoreStats
from asr_server.engine.process import child
from asr_server.engine.process import messages as m
from asr_server.engine.process.replies import Replies
from asr_server.engine.types import DecodeRequest, DecodeResult
from asr_server.errors import FailedPrecondition, Unavailable
from asr_server.worker import State

logger = logging.getLogger(__name__)

# The engine process's own texts where the in-process runner has the same situation (engine/runner.py), so a caller
# reads the same thing in both modes.
NOT_READY = "the engine is {state}; retry on another replica or later"
SHUTTING_DOWN = "the server is shutting down; retry on another replica"
LOST = "the engine process went down while decoding this request (it is being restarted); retry"


@dataclass(frozen=True)
class RestartPolicy:
    # A child that is not Ready this long after it was started is killed (and restarted).
    start_timeout_s: float = 900.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    stable_after_s: float = 60.0
    # On stop: SIGTERM, then SIGKILL after this.
    stop_grace_s: float = 10.0


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def _resolver(future: asyncio.Future[object]) -> Callable[[], None]:
    def resolve() -> None:
        if not future.done():
            future.set_result(None)

    return resolve


class EngineProcess:
    """One replica's engine core in a supervised child process."""

    def __init__(
        self,
        config: Config,
        device: str,
        *,
        name: str = "engine",
        policy: RestartPolicy | None = None,
        shared: bool = False,
    ):
        self._config = config
        # With `shared` (--front-processes > 1), every child also serves the front processes on a ROUTER socket at
        # `serve_address`, one path for all its generations (engine/process/link.py connects to it).
        self._shared = shared
        self.serve_address = ""
        self._device = device
        self._name = name
        self._policy = policy or RestartPolicy()
        self._state: State = "new"
        self._model_id = ""
        self._replies = Replies()
        self._listeners: list[Callable[[bool], None]] = []
        self._socket: zmq.asyncio.Socket | None = None  # of the child that is ready; None while there is none
        self._process: BaseProcess | None = None
        self._context: zmq.asyncio.Context | None = None
        self._directory = ""
        self._supervisor: asyncio.Task[None] | None = None
        self._first_start: asyncio.Future[None] | None = None
        self._stopping = asyncio.Event()
        self.starts = 0
        self.last_exit = ""
        # The last CoreStats the child pushed (None before the first, and again once a child is gone: a successor's
        # counters start over).
        self.core_stats: CoreStats | None = None

    # ---- what the transcriber and the replica balancer read ----

    @property
    def state(self) -> State:
        return self._state

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def in_flight(self) -> int:
        """Requests sent to the engine process and not yet answered."""
        return self._replies.in_flight

    @property
    def pid(self) -> int | None:
        """The running child's pid (None when there is none)."""
        process = self._process
        return process.pid if process is not None and process.exitcode is None else None

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """`listener(ready)` runs (on the event loop) whenever the engine becomes ready or stops being ready."""
        self._listeners.append(listener)

    # ---- lifecycle ----

    async def start(self) -> None:
        """Starts the child and returns once it is ready; raises RuntimeError when its first start fails."""
        if self._state != "new":
            raise RuntimeError(f"engine already {self._state}")
        self._set_state("starting")
        self._directory = await asyncio.to_thread(tempfile.mkdtemp, prefix="asr-engine-")
        if self._shared:
            self.serve_address = f"ipc://{os.path.join(self._directory, 'fronts.sock')}"
        self._context = zmq.asyncio.Context()
        self._first_start = asyncio.get_running_loop().create_future()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"{self._name}-supervisor")
        await self._first_start

    async def stop(self) -> None:
        """Stops the child (SIGTERM: it answers what it holds Unavailable and exits; SIGKILL after the grace)."""
        if self._state in ("stopping", "stopped"):
            return
        if self._state == "new":
            self._state = "stopped"
            return
        self._stopping.set()
        self._set_state("stopping")
        # The supervisor stops the child it runs, whatever step it is at (spawning, loading, serving, backing off).
        if self._supervisor is not None:
            await self._supervisor
        self._fail_pending(Unavailable(SHUTTING_DOWN))
        if self._context is not None:
            self._context.destroy(linger=0)
        if self._directory:
            await asyncio.to_thread(shutil.rmtree, self._directory, True)
        self._state = "stopped"

    # ---- requests ----

    async def decode(self, request: DecodeRequest) -> DecodeResult:
        socket = self._socket
        if self._state != "ready" or socket is None:
            raise Unavailable(NOT_READY.format(state=self._state))

        def abort(request_id: str) -> None:
            # Only to the child that has it: a successor never heard of this request.
            if self._socket is socket:
                self._send(socket, m.Abort(request_id))

        return await self._replies.decode(request, lambda frames: self._send_frames(socket, frames), abort)

    async def stats(self, timeout_s: float = 5.0) -> m.Stats:
        """What the engine process holds now (its own count, not the front's)."""
        socket = self._socket
        if self._state != "ready" or socket is None:
            raise Unavailable(NOT_READY.format(state=self._state))
        return await self._replies.stats(lambda message: self._send(socket, message), timeout_s)

    def _send(self, socket: zmq.asyncio.Socket, message: m.ToEngine) -> None:
        self._send_frames(socket, [m.encode(message)])

    def _send_frames(self, socket: zmq.asyncio.Socket, frames: list[bytes | memoryview]) -> None:
        # Never blocks: the queues are unbounded (the child applies --max-queued-requests). NOBLOCK through the
        # asyncio socket, whose bookkeeping then re-checks for frames that arrived meanwhile. copy=False: ZeroMQ
        # sends the audio from the array's memory (it holds a reference until sent; smaller frames it copies).
        # It fails only when the child's connection is already gone, before its exit was seen. (pyzmq types the
        # result as an Awaitable; it is a Future already, which ensure_future returns as is.)
        sent = asyncio.ensure_future(socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False))
        error = sent.exception() if sent.done() else None
        if error is not None:
            raise Unavailable(LOST) from error

    # ---- the supervisor ----

    async def _supervise(self) -> None:
        backoff_s = self._policy.backoff_initial_s
        ever_ready = False
        while not self._stopping.is_set():
            started_s = time.monotonic()
            was_ready, failure = await self._run_child()
            ever_ready = ever_ready or was_ready
            if self._stopping.is_set():
                break
            if not ever_ready:
                # The very first start failed: a wrong model path or an unusable device will not heal by retrying.
                self._set_state("failed")
                # As the in-process worker does: RuntimeError caused by the loader's error, which the CLI prints as
                # one line (the child logged the traceback).
                error = RuntimeError(f"engine failed to start: {failure}")
                error.__cause__ = FailedPrecondition(str(failure))
                self._resolve_first_start(error)
                return
            if time.monotonic() - started_s >= self._policy.stable_after_s:
                backoff_s = self._policy.backoff_initial_s
            logger.warning("%s process %s; restarting in %.1f s", self._name, failure, backoff_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff_s)
            backoff_s = min(backoff_s * 2, self._policy.backoff_max_s)
        # Stopped while the first child was loading: start() returns (as an in-process runner's does); the state
        # says "stopping", so nothing is sent to it.
        self._resolve_first_start(None)

    async def _run_child(self) -> tuple[bool, str]:
        """Runs one child from spawn to exit. Returns whether it became ready and how it ended."""
        if self._context is None:
            raise RuntimeError("the supervisor runs only after start()")
        loop = asyncio.get_running_loop()
        self.starts += 1
        self._set_state("starting")
        address = f"ipc://{os.path.join(self._directory, f'{self.starts}.sock')}"
        socket = self._context.socket(zmq.DEALER)
        socket.sndhwm = 0
        socket.rcvhwm = 0
        socket.linger = 0
        socket.bind(address)
        ready = asyncio.Event()
        failure: list[str] = []
        receiver = asyncio.create_task(self._receive(socket, ready, failure))
        spec = child.ChildSpec(
            config=self._config,
            device=self._device,
            address=address,
            parent_pid=os.getpid(),
            name=self._name,
            log_level=logging.getLogger().getEffectiveLevel(),
            serve_address=self.serve_address,
        )
        process = multiprocessing.get_context("spawn").Process(
            target=child.main, args=(spec,), name=f"asr-{self._name}", daemon=True
        )
        exited: asyncio.Future[object] = loop.create_future()
        try:
            try:
                await asyncio.to_thread(process.start)
            except OSError as exc:
                return False, f"could not start: {exc}"
            self._process = process
            loop.add_reader(process.sentinel, _resolver(exited))
            logger.info("%s process started (pid %d) on %s", self._name, process.pid, self._device)
            became_ready: asyncio.Future[object] = asyncio.ensure_future(ready.wait())
            stopping: asyncio.Future[object] = asyncio.ensure_future(self._stopping.wait())
            done, _ = await asyncio.wait(
                {exited, became_ready, stopping},
                timeout=self._policy.start_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            became_ready.cancel()
            was_ready = ready.is_set() and not exited.done()
            if was_ready and not self._stopping.is_set():
                self._socket = socket
                self._set_state("ready")
                self._resolve_first_start(None)
            elif not done:
                logger.error("%s process not ready after %.0f s; killing it", self._name, self._policy.start_timeout_s)
                process.kill()
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not exited.done():
                await self._terminate(process, exited)
            loop.remove_reader(process.sentinel)
            process.join(0)  # reaps it (it has exited: no wait)
            self.last_exit = describe_exit(process.exitcode)
            self._socket = None
            self.core_stats = None
            if not self._stopping.is_set():
                self._set_state("failed")
                logger.error("%s process (pid %d) %s", self._name, process.pid, self.last_exit)
            # Whatever it held is lost with it: its callers are told at once that a retry can succeed.
            self._fail_pending(Unavailable(SHUTTING_DOWN if self._stopping.is_set() else LOST))
            return was_ready, failure[0] if failure else self.last_exit
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
            socket.close(linger=0)

    async def _terminate(self, process: BaseProcess, exited: asyncio.Future[object]) -> None:
        """SIGTERM (the child answers what it holds and exits), SIGKILL after the grace."""
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(exited), self._policy.stop_grace_s)
        except TimeoutError:
            logger.warning("%s process (pid %s) ignored SIGTERM; killing it", self._name, process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await exited

    async def _receive(self, socket: zmq.asyncio.Socket, ready: asyncio.Event, failure: list[str]) -> None:
        while True:
            self._dispatch(await socket.recv(copy=False), ready, failure)

    def _dispatch(self, frame: zmq.Frame, ready: asyncio.Event, failure: list[str]) -> None:
        try:
            message = m.decode_from_engine(frame.buffer)
        except Exception:  # noqa: BLE001 - a frame we cannot read is a bug, logged; the others go on
            logger.exception("%s: unreadable frame from the engine process", self._name)
            return
        if self._replies.resolve(message):
            return
        if isinstance(message, m.CoreStatsPush):
            self.core_stats = m.core_stats_from_message(message)
        elif isinstance(message, m.Ready):
            self._model_id = message.model_id
            ready.set()
        elif isinstance(message, m.StartFailed):
            failure.append(message.message)

    def _fail_pending(self, error: Unavailable) -> None:
        self._replies.fail_all(error, Unavailable(NOT_READY.format(state=self._state)))

    def _resolve_first_start(self, error: BaseException | None) -> None:
        first = self._first_start
        if first is None or first.done():
            return
        if error is None:
            first.set_result(None)
        else:
            first.set_exception(error)

    def _set_state(self, state: State) -> None:
        was_ready = self._state == "ready"
        self._state = state
        if was_ready != (state == "ready"):
            for listener in self._listeners:
                listener(state == "ready")
