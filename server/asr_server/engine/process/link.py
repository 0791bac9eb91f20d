"""A front process's side of a shared engine process (--front-processes > 1): the EngineRunner interface (state,
model_id, in_flight, start, stop, decode) over a DEALER socket connected to the engine's ROUTER path.

The front does not own the engine process (the parent supervises it, edge/fronts.py), so it cannot watch its exit;
it learns of an engine's death two ways, whichever comes first: ZeroMQ reports the connection's end (the socket
monitor's DISCONNECTED, at once for a killed process on a unix socket), or the engine stops answering the Hello
heartbeat. Either way every request it held fails Unavailable (retryable, as when a front's own engine process
dies) and the state leaves "ready" (health NOT_SERVING) until a Ready comes back: from the restarted engine, at
the same path, which ZeroMQ reconnects to by itself. A Ready with another pid than the last also fails what was
held: the engine was replaced between two heartbeats. ZMQ_IMMEDIATE keeps a Submit from being queued for an
engine that is not connected: it fails at once instead of reaching a successor that never heard of its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from asr_server.engine.process import messages as m
from asr_server.engine.process.client import LOST, NOT_READY, SHUTTING_DOWN
from asr_server.engine.process.replies import Replies
from asr_server.engine.types import DecodeRequest, DecodeResult
from asr_server.errors import Unavailable
from asr_server.worker import State

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.2
# No Ready for this long: the engine is taken for gone. The engine answers a Hello from its event loop, not its
# engine thread, so a long decode step does not delay it.
HEARTBEAT_TIMEOUT_S = 1.5


class EngineLink:
    """One shared engine process, as seen from one front process."""

    def __init__(
        self,
        address: str,
        *,
        name: str = "engine",
        heartbeat_s: float = HEARTBEAT_S,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
    ) -> None:
        self._address = address
        self._name = name
        self._heartbeat_s = heartbeat_s
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._state: State = "new"
        self._model_id = ""
        self._engine_pid: int | None = None
        self._last_ready_s = 0.0
        self._replies = Replies()
        self._listeners: list[Callable[[bool], None]] = []
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self.losses = 0

    @property
    def state(self) -> State:
        return self._state

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def in_flight(self) -> int:
        return self._replies.in_flight

    @property
    def pid(self) -> int | None:
        """The engine process's pid, from its last Ready (None before the first)."""
        return self._engine_pid

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        """Connects and returns once the engine has answered a Hello (the parent starts fronts after its engines
        are ready, so this is one round trip)."""
        if self._state != "new":
            raise RuntimeError(f"engine link already {self._state}")
        self._set_state("starting")
        self._context = zmq.asyncio.Context()
        socket = self._context.socket(zmq.DEALER)
        socket.sndhwm = 0
        socket.rcvhwm = 0
        socket.linger = 0
        socket.immediate = 1
        socket.reconnect_ivl = 50  # ms: a restarted engine is found soon after it binds
        monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        socket.connect(self._address)
        self._socket = socket
        self._tasks = [
            asyncio.create_task(self._receive(socket), name=f"{self._name}-receive"),
            asyncio.create_task(self._heartbeat(socket), name=f"{self._name}-heartbeat"),
            asyncio.create_task(self._watch(monitor), name=f"{self._name}-monitor"),
        ]
        await self._ready.wait()

    async def stop(self) -> None:
        if self._state in ("stopping", "stopped"):
            return
        self._set_state("stopping")
        self._ready.set()  # a start() still waiting returns
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_pending(Unavailable(SHUTTING_DOWN))
        if self._socket is not None:
            self._socket.disable_monitor()
        if self._context is not None:
            self._context.destroy(linger=0)
        self._state = "stopped"

    async def decode(self, request: DecodeRequest) -> DecodeResult:
        socket = self._socket
        if self._state != "ready" or socket is None:
            raise Unavailable(NOT_READY.format(state=self._state))

        def abort(request_id: str) -> None:
            if self._state == "ready":
                with contextlib.suppress(Unavailable):
                    self._send_frames(socket, [m.encode(m.Abort(request_id))])

        return await self._replies.decode(request, lambda frames: self._send_frames(socket, frames), abort)

    async def stats(self, timeout_s: float = 5.0) -> m.Stats:
        """What the engine process holds now, for all fronts together."""
        socket = self._socket
        if self._state != "ready" or socket is None:
            raise Unavailable(NOT_READY.format(state=self._state))
        return await self._replies.stats(lambda message: self._send_frames(socket, [m.encode(message)]), timeout_s)

    def _send_frames(self, socket: zmq.asyncio.Socket, frames: list[bytes | memoryview]) -> None:
        # As EngineProcess sends (client.py); with ZMQ_IMMEDIATE a send while the engine is not connected fails
        # EAGAIN at once: the caller is told to retry.
        sent = asyncio.ensure_future(socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False))
        error = sent.exception() if sent.done() else None
        if error is not None:
            raise Unavailable(LOST) from error

    async def _heartbeat(self, socket: zmq.asyncio.Socket) -> None:
        hello: list[bytes | memoryview] = [m.encode(m.Hello())]
        while True:
            # Not connected (the engine is restarting): EAGAIN, tried again next beat.
            with contextlib.suppress(Unavailable):
                self._send_frames(socket, hello)
            await asyncio.sleep(self._heartbeat_s)
            silent_s = time.monotonic() - self._last_ready_s
            if self._state == "ready" and silent_s > self._heartbeat_timeout_s:
                self._lose(f"no heartbeat answer for {silent_s:.1f} s")

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._lose("its connection closed")

    async def _receive(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            frame = await socket.recv(copy=False)
            try:
                message = m.decode_from_engine(frame.buffer)
            except Exception:  # noqa: BLE001 - a frame we cannot read is a bug, logged; the others go on
                logger.exception("%s: unreadable frame from the engine process", self._name)
                continue
            self._dispatch(message)

    def _dispatch(self, message: m.FromEngine) -> None:
        if self._replies.resolve(message):
            return
        if isinstance(message, m.Ready):
            self._on_ready(message)
        else:  # StartFailed goes to the supervisor only; nothing for a front
            logger.warning("%s: unexpected %s from the engine", self._name, type(message).__name__)

    def _on_ready(self, message: m.Ready) -> None:
        if self._state in ("stopping", "stopped"):
            return
        self._last_ready_s = time.monotonic()
        if self._engine_pid is not None and message.pid != self._engine_pid and self._state == "ready":
            self._lose(f"it was replaced (pid {self._engine_pid} -> {message.pid})")
        if self._state != "ready":
            logger.info("%s (pid %d) ready for this front", self._name, message.pid)
        self._engine_pid = message.pid
        self._model_id = message.model_id
        self._set_state("ready")
        self._ready.set()

    def _lose(self, reason: str) -> None:
        if self._state != "ready":
            return
        self.losses += 1
        held = self._replies.held
        logger.error("%s (pid %s) lost: %s; failing %d requests", self._name, self._engine_pid, reason, held)
        self._set_state("failed")
        self._fail_pending(Unavailable(LOST))

    def _fail_pending(self, error: Unavailable) -> None:
        self._replies.fail_all(error, Unavailable(NOT_READY.format(state=self._state)))

    def _set_state(self, state: State) -> None:
        was_ready = self._state == "ready"
        self._state = state
        if was_ready != (state == "ready"):
            for listener in self._listeners:
                listener(state == "ready")
