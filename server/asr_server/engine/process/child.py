"""The engine process: the main loop of one replica's engine core, started by the front with multiprocessing's
"spawn" context (a fresh interpreter: nothing of the front's torch, CUDA or gRPC state is inherited).

Inside, an ordinary EngineRunner (engine/runner.py) loads the core on its own thread and does the batching,
back-pressure and aborts exactly as in-process; this loop only carries its calls over one ZeroMQ DEALER socket
connected to the front. With --front-processes > 1 the process also binds a ROUTER socket at a stable path
(`serve_address`, the same for every restart) once the core is ready: each front connects a DEALER to it, and
every answer is routed back to the front that asked by its ZeroMQ identity; a front's Hello (its heartbeat) is
answered with Ready, whose pid tells it whether this is the engine it knew. Each Submit becomes a task awaiting
`runner.decode`; an Abort cancels that task, which
withdraws the request from the runner at once. Errors go back as Failure messages (messages.py).

The process stops on SIGTERM (the runner answers what is still queued with Unavailable,
those answers are sent, then it exits), and also when its parent is gone: it polls its parent pid, because an
engine process left behind a killed front would hold the device (and its memory) for nobody.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from asr_server.config import Config
from asr_server.engine.core import CoreStats, core_stats
from asr_server.engine.cores import batching_policy, make_core_factory
from asr_server.engine.process import messages as m
from asr_server.engine.runner import EngineRunner
from asr_server.engine.types import DecodeRequest
from asr_server.errors import AsrError
from asr_server.heap import freeze_startup_heap

logger = logging.getLogger(__name__)

# How often the process checks that its parent still lives: a front killed with SIGKILL costs the device at most this.
PARENT_POLL_S = 0.5
# A front (on the shared ROUTER socket) not heard from this long is taken for dead (it beats every 0.2 s).
FRONT_SILENCE_S = 2.0
# On the way out, the answers still in the socket get this long to reach the front.
_LINGER_MS = 2000
# How often the core's stats go to the front while they change (its metrics are at most this stale).
STATS_PUSH_S = 1.0


@dataclass(frozen=True)
class ChildSpec:
    """What the engine process is started with (pickled once by multiprocessing at spawn; frozen values only)."""

    config: Config
    device: str
    address: str  # the front's bound socket: ipc:///path
    parent_pid: int
    name: str
    log_level: int = logging.INFO
    # ipc:///path of the ROUTER socket the front processes share (--front-processes > 1); "" for none.
    serve_address: str = ""


class _Counters:
    def __init__(self) -> None:
        self.submitted = 0
        self.aborted = 0
        self.finished = 0


def main(spec: ChildSpec) -> None:
    """The process's entry point (the multiprocessing target)."""
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s %(levelname)s %(name)s [{spec.name} pid {os.getpid()}]: %(message)s",
        stream=sys.stderr,
    )
    # Ctrl-C in a terminal reaches the whole process group: the front handles it and stops this process in order
    # (after draining its calls), so the engine must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    interval_ms = spec.config.server.gil_switch_interval_ms
    if interval_ms > 0:
        sys.setswitchinterval(interval_ms / 1000)
    orphaned = threading.Event()
    code = asyncio.run(_serve(spec, orphaned))
    if orphaned.is_set() and spec.address.startswith("ipc://"):
        # The front that made the socket's directory was killed and cannot remove it; nobody else will.
        shutil.rmtree(os.path.dirname(spec.address.removeprefix("ipc://")), ignore_errors=True)
    sys.exit(code)


async def _serve(spec: ChildSpec, orphaned: threading.Event) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.DEALER)
    # Unbounded queues: back-pressure is the runner's (--max-queued-requests), never a socket that blocks.
    socket.sndhwm = 0
    socket.rcvhwm = 0
    socket.linger = _LINGER_MS
    socket.connect(spec.address)
    watchdog = asyncio.create_task(_watch_parent(spec.parent_pid, stop, orphaned))
    engine = spec.config.engine
    runner = EngineRunner(
        make_core_factory(spec.config, spec.device), batching_policy(engine), name=spec.name, warmup=engine.warmup
    )
    try:
        start = asyncio.create_task(runner.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            # Stopped while loading (the front is going away): nobody waits for this engine any more.
            logger.info("stopped while loading")
            return 0
        stopped.cancel()
        try:
            start.result()
        except Exception as exc:  # noqa: BLE001 - reported to the front, which fails its start with it
            await socket.send(m.encode(m.StartFailed(str(exc))))
            return 1
        freeze_startup_heap("engine process")
        await socket.send(m.encode(m.Ready(model_id=runner.model_id, pid=os.getpid())))
        logger.info("engine process ready (%s on %s)", runner.model_id, spec.device)
        channels = [_Channel(socket, routed=False)]
        if spec.serve_address:
            shared = context.socket(zmq.ROUTER)
            shared.sndhwm = 0
            shared.rcvhwm = 0
            shared.linger = _LINGER_MS
            # Bound only now, so a front's DEALER (ZMQ_IMMEDIATE) can send nothing to an engine still loading; the
            # path is its predecessor's (libzmq unlinks a stale socket file), so the fronts reconnect by themselves.
            shared.bind(spec.serve_address)
            channels.append(_Channel(shared, routed=True))
            logger.info("serving the front processes on %s", spec.serve_address)
        await _loop(channels, runner, stop)
        # An engine thread that died leaves the process too: the front sees the exit and starts a fresh one, where
        # a process that stayed would answer every request "failed" for ever.
        return 1 if runner.state == "failed" else 0
    finally:
        watchdog.cancel()
        # Stops the engine thread: requests still queued or decoding are answered Unavailable by their tasks.
        await runner.stop()
        context.destroy(linger=_LINGER_MS)


class _Channel:
    """One socket the engine answers on: the supervisor's DEALER, or the fronts' ROUTER (`routed`: every message
    starts with the sending peer's identity, and every answer with the identity of the peer it goes to)."""

    def __init__(self, socket: zmq.asyncio.Socket, *, routed: bool) -> None:
        self.socket = socket
        self.routed = routed
        # When each front was last heard from (its Hello beats every 0.2 s): a silent one is gone.
        self.last_heard_s: dict[bytes, float] = {}

    async def receive(self) -> tuple[bytes, list[zmq.Frame]]:
        frames = await self.socket.recv_multipart(copy=False)
        if not self.routed:
            return b"", frames
        peer = frames[0].bytes
        self.last_heard_s[peer] = time.monotonic()
        return peer, frames[1:]

    def send(self, peer: bytes, message: m.FromEngine) -> None:
        frames = [peer, m.encode(message)] if self.routed else [m.encode(message)]
        # NOBLOCK through the asyncio socket: sent at once (the queue is unbounded), and pyzmq re-checks for frames
        # that arrived meanwhile (a send can consume the edge of its file descriptor). It fails only when the
        # front's end is gone (a ROUTER drops an answer to a peer that left): then nobody waits for this answer.
        sent = asyncio.ensure_future(self.socket.send_multipart(frames, zmq.NOBLOCK))  # a Future already
        if sent.done() and sent.exception() is not None:
            logger.warning("an answer could not be sent to the front: %s", sent.exception())


# A request is known by the peer that sent it (b"" on the supervisor's DEALER) and its id: two fronts may use the
# same request id.
_Key = tuple[bytes, str]


async def _loop(channels: list[_Channel], runner: EngineRunner, stop: asyncio.Event) -> None:
    tasks: dict[_Key, asyncio.Task[None]] = {}
    counters = _Counters()
    receiving = [asyncio.create_task(_receive(channel, runner, tasks, counters, stop)) for channel in channels]
    receiving += [asyncio.create_task(_forget_silent_fronts(channel, tasks)) for channel in channels if channel.routed]
    # Stats go to the supervisor's channel only: its EngineProcess serves the metrics (fronts sharing the engine
    # through the ROUTER do not serve /metrics).
    receiving += [asyncio.create_task(_push_stats(channel, runner)) for channel in channels if not channel.routed]
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({*receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopping:
                task.result()  # only ends by raising: a bug, logged by the caller's traceback
    finally:
        for task in receiving:
            task.cancel()
        stopping.cancel()
        # The runner's stop answers the requests still held (Unavailable); their tasks send those answers.
        await runner.stop()
        if tasks:
            await asyncio.gather(*tasks.values(), return_exceptions=True)


async def _receive(
    channel: _Channel,
    runner: EngineRunner,
    tasks: dict[_Key, asyncio.Task[None]],
    counters: _Counters,
    stop: asyncio.Event,
) -> None:
    while True:
        peer, frames = await channel.receive()
        message = m.decode_to_engine(frames[0].buffer)
        if isinstance(message, m.Submit):
            counters.submitted += 1
            if len(frames) != 2:
                raise ValueError(f"a Submit came in {len(frames)} frames, not 2")
            request = m.request_from_submit(message, frames[1].buffer)
            if peer:
                # The runner knows a request by its id alone; two fronts' ids are kept apart by their peer's.
                request = dataclasses.replace(request, request_id=f"{peer.hex()}/{message.request_id}")
            key = (peer, message.request_id)
            task = asyncio.create_task(_decode(channel, peer, message.request_id, runner, request, counters, stop))
            tasks[key] = task
            task.add_done_callback(_forget(tasks, key))
        elif isinstance(message, m.Abort):
            aborted = tasks.pop((peer, message.request_id), None)
            if aborted is not None:
                counters.aborted += 1
                aborted.cancel()
        elif isinstance(message, m.Hello):
            channel.send(peer, m.Ready(model_id=runner.model_id, pid=os.getpid()))
        else:  # StatsQuery
            stats = m.Stats(message.query_id, len(tasks), counters.submitted, counters.aborted, counters.finished)
            channel.send(peer, stats)


async def _forget_silent_fronts(channel: _Channel, tasks: dict[_Key, asyncio.Task[None]]) -> None:
    """Drops the requests of a front that stopped beating (killed: it can send no Abort), so the engine does not
    decode for nobody (a ROUTER is not told that a peer left)."""
    while True:
        await asyncio.sleep(FRONT_SILENCE_S / 4)
        now_s = time.monotonic()
        gone = {peer for peer, heard_s in channel.last_heard_s.items() if now_s - heard_s > FRONT_SILENCE_S}
        for peer in gone:
            del channel.last_heard_s[peer]
            dropped = [key for key in tasks if key[0] == peer]
            if dropped:
                logger.warning("a front process went silent; dropping its %d requests", len(dropped))
            for key in dropped:
                tasks.pop(key).cancel()


async def _push_stats(channel: _Channel, runner: EngineRunner) -> None:
    """Sends the core's stats every STATS_PUSH_S while they change (an idle engine sends nothing); the first push
    comes at once, so the front knows e.g. the KV cache's size before any request. They carry the core's queue
    lengths, which the front's metrics and autoscaler (edge/ray_autoscale.py) read."""
    last: CoreStats | None = None
    while True:
        core = runner.core
        stats = core_stats(core)
        if stats is not None and core is not None:
            stats = dataclasses.replace(stats, waiting_requests=core.num_waiting(), running_requests=core.num_running())
        if stats is not None and stats != last:
            channel.send(b"", m.core_stats_message(stats))
            last = stats
        await asyncio.sleep(STATS_PUSH_S)


def _forget(tasks: dict[_Key, asyncio.Task[None]], key: _Key) -> Callable[[asyncio.Task[None]], None]:
    def forget(task: asyncio.Task[None]) -> None:
        if tasks.get(key) is task:
            del tasks[key]

    return forget


async def _decode(
    channel: _Channel,
    peer: bytes,
    request_id: str,
    runner: EngineRunner,
    request: DecodeRequest,
    counters: _Counters,
    stop: asyncio.Event,
) -> None:
    reply: m.Result | m.Failure
    try:
        result = await runner.decode(request)
    except asyncio.CancelledError:
        return  # aborted: the front has already answered its caller
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the front, which raises it for the caller
        if not isinstance(exc, AsrError):
            logger.exception("request %s failed in the engine", request.request_id)
        reply = m.failure_message(request_id, exc)
        if runner.state == "failed":
            logger.error("the engine thread is gone; the engine process exits to be restarted")
            stop.set()
    else:
        reply = m.result_message(dataclasses.replace(result, request_id=request_id))
    counters.finished += 1
    channel.send(peer, reply)


async def _watch_parent(parent_pid: int, stop: asyncio.Event, orphaned: threading.Event) -> None:
    # Polled: no event tells a child that its parent died (the pid turns into a reaper's once it has).
    while os.getppid() == parent_pid:  # noqa: ASYNC110
        await asyncio.sleep(PARENT_POLL_S)
    logger.warning("the front process (pid %d) is gone; stopping the engine", parent_pid)
    orphaned.set()
    stop.set()
    # A hung engine thread must not keep the device: if stopping takes too long, leave hard.
    await asyncio.sleep(30.0)
    logger.error("the engine did not stop within 30 s of its parent's death; exiting")
    os._exit(1)
