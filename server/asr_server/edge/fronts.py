"""Several gRPC front processes on one port (--front-processes N > 1).

The process `asr-server serve` starts becomes the parent. It probes and reserves the port (a socket bound with
SO_REUSEPORT that never listens: it keeps the port from being taken, or chosen for --port 0, between the fronts'
restarts, and takes no connections), starts the engine processes itself (it is their supervisor, exactly as a
single front is: engine/process/client.py), then spawns N front processes (multiprocessing "spawn"). Each front is
an ordinary AsrServer whose gRPC server binds the same port with SO_REUSEPORT and whose engine is a link to every
shared engine process (engine/process/link.py: a DEALER to each engine's ROUTER socket).

The kernel spreads new connections over the listening fronts (a hash of the connection); a connection stays on its
front, so it balances connections, not calls. A front that dies (kill -9) loses its own calls only: the others
keep their connections and the engines, and the parent starts a new front on the port (backoff 0.5 s doubling to
30 s). SIGTERM (or SIGINT) to the parent drains first the fronts (each does its graceful stop: NOT_SERVING, the
grace for in-flight calls) and then stops the engine processes. Fronts and engines exit by themselves when the
parent is gone (they poll their parent pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from asr_server.config import Config
from asr_server.edge.server import EXIT_MODEL, EXIT_PORT, EXIT_STARTUP, AsrServer, StartupError, bind_problem
from asr_server.engine.factory import engine_devices, linked_engine
from asr_server.engine.process.client import EngineProcess, describe_exit
from asr_server.errors import AsrError
from asr_server.logs import TEXT_FORMAT, setup_logging
from asr_server.tracing import setup_tracing

logger = logging.getLogger(__name__)

PARENT_POLL_S = 0.5
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
# A front gets its grace for in-flight calls plus this to exit after SIGTERM before it is killed.
STOP_MARGIN_S = 10.0


@dataclass(frozen=True)
class FrontSpec:
    """What a front process is started with (pickled at spawn)."""

    config: Config  # the port resolved, --metrics-port off (one port cannot be N fronts' /metrics)
    index: int
    engine_addresses: tuple[str, ...]
    parent_pid: int
    log_level: str
    log_format: str


# ---- the front process ----


def front_main(spec: FrontSpec, report: Connection) -> None:
    """A front process's entry point (the multiprocessing target). Reports ("ready", pid) or ("failed", message,
    exit code) over `report` once started."""
    # Ctrl-C reaches the whole process group; the parent orders the stop (fronts first, then engines).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(spec.log_level, "json" if spec.log_format == "json" else "text")
    if spec.log_format != "json":
        # Every line says which front wrote it: an access line tells which process served the call.
        prefix = f"[front-{spec.index} pid {os.getpid()}]"
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(TEXT_FORMAT.replace("%(name)s:", f"%(name)s {prefix}:")))
    interval_ms = spec.config.server.gil_switch_interval_ms
    if interval_ms > 0:
        sys.setswitchinterval(interval_ms / 1000)
    sys.exit(asyncio.run(_front(spec, report)))


async def _front(spec: FrontSpec, report: Connection) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    provider = setup_tracing(spec.config.tracing)
    server = AsrServer(spec.config, engine=linked_engine(list(spec.engine_addresses)), freeze_heap=True)
    watchdog = asyncio.create_task(_watch_parent(spec.parent_pid, stop))
    start = asyncio.create_task(server.start())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if start.done():
            try:
                start.result()
            except StartupError as exc:
                report.send(("failed", str(exc), exc.exit_code))
                return exc.exit_code
            logger.info("front %d (pid %d) serving on port %d", spec.index, os.getpid(), server.port)
            report.send(("ready", os.getpid()))
            await stopped
        logger.info("front %d shutting down: NOT_SERVING, %.1f s grace", spec.index, spec.config.server.grace_period_s)
    finally:
        await server.stop()
        for task in (start, stopped, watchdog):
            task.cancel()
        report.close()
        if provider is not None:
            await asyncio.to_thread(provider.shutdown)
    return 0


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    # Polled: no event tells a child that its parent died. A front left behind would hold the port for nobody.
    while os.getppid() == parent_pid:  # noqa: ASYNC110
        await asyncio.sleep(PARENT_POLL_S)
    logger.warning("the parent process (pid %d) is gone; stopping this front", parent_pid)
    stop.set()


# ---- the parent ----


def _reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never listening SO_REUSEPORT socket on host:port (port 0: a free one is chosen)."""
    # Probed first without SO_REUSEPORT: a port held by anyone (another server of ours too) is refused, not shared.
    problem = bind_problem(host, port) if port else ""
    if problem:
        raise StartupError(problem, exit_code=EXIT_PORT)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reserved = socket.socket(family, socket.SOCK_STREAM)
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind((host.strip("[]"), port))
    except OSError as exc:
        reserved.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"port {port} is in use; pick another --port", exit_code=EXIT_PORT) from exc
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", exit_code=EXIT_PORT) from exc
    return reserved


class _Front:
    """Runs one front process and starts it again when it dies."""

    def __init__(self, spec: FrontSpec, stop_after_s: float) -> None:
        self.spec = spec
        self._stop_after_s = stop_after_s
        self._stopping = asyncio.Event()
        self._process: BaseProcess | None = None
        self._task: asyncio.Task[None] | None = None
        self.first_ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.starts = 0

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.exitcode is None else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"front-{self.spec.index}")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _supervise(self) -> None:
        backoff_s = BACKOFF_INITIAL_S
        ever_ready = False
        while not self._stopping.is_set():
            started_s = time.monotonic()
            ready, why, code = await self._run_once()
            ever_ready = ever_ready or ready
            if self._stopping.is_set():
                break
            if not ever_ready:
                # The first start failed: the port or the config will not heal by retrying; the server fails.
                if not self.first_ready.done():
                    self.first_ready.set_exception(StartupError(why, exit_code=code))
                return
            if time.monotonic() - started_s >= STABLE_AFTER_S:
                backoff_s = BACKOFF_INITIAL_S
            logger.warning("front %d %s; restarting it in %.1f s", self.spec.index, why, backoff_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff_s)
            backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
        if not self.first_ready.done():
            self.first_ready.set_result(None)

    async def _run_once(self) -> tuple[bool, str, int]:
        """One front process from spawn to exit: whether it got ready, how it ended, the exit code to fail with."""
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        receiving, sending = context.Pipe(duplex=False)
        process = context.Process(
            target=front_main, args=(self.spec, sending), name=f"asr-front-{self.spec.index}", daemon=True
        )
        self.starts += 1
        try:
            await asyncio.to_thread(process.start)
        except OSError as exc:
            receiving.close()
            sending.close()
            return False, f"could not start: {exc}", EXIT_STARTUP
        sending.close()  # the child's end: our copy closed, its exit reads as EOF here
        self._process = process
        exited: asyncio.Future[object] = loop.create_future()
        reported: asyncio.Future[object] = loop.create_future()
        loop.add_reader(process.sentinel, _resolve, exited, None)
        loop.add_reader(receiving.fileno(), _read_report, receiving, reported)
        stopping: asyncio.Future[object] = asyncio.ensure_future(self._stopping.wait())
        try:
            logger.info("front %d started (pid %d)", self.spec.index, process.pid)
            await asyncio.wait({reported, exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            report = reported.result() if reported.done() else None
            ready = isinstance(report, tuple) and report[0] == "ready"
            why, code = "", EXIT_STARTUP
            if isinstance(report, tuple) and report[0] == "failed":
                why, code = str(report[1]), int(str(report[2]))
            if ready and not self.first_ready.done():
                self.first_ready.set_result(None)
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                await self._terminate(process, exited)
            process.join(0)
            ending = describe_exit(process.exitcode)
            if not self._stopping.is_set():
                logger.error("front %d (pid %d) %s", self.spec.index, process.pid, ending)
            return ready, why or f"front process {ending}", code
        finally:
            stopping.cancel()
            loop.remove_reader(process.sentinel)
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(receiving.fileno())
            receiving.close()

    async def _terminate(self, process: BaseProcess, exited: asyncio.Future[object]) -> None:
        """SIGTERM (the front drains: NOT_SERVING, its grace for in-flight calls), SIGKILL after the grace."""
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(exited), self._stop_after_s)
        except TimeoutError:
            logger.warning("front %d (pid %s) did not stop in time; killing it", self.spec.index, process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await exited


def _resolve(future: asyncio.Future[object], value: None) -> None:
    if not future.done():
        future.set_result(value)


def _read_report(connection: Connection, future: asyncio.Future[object]) -> None:
    if future.done():
        return
    try:
        message = connection.recv()
    except (EOFError, OSError):
        message = None  # the front died before reporting
    asyncio.get_running_loop().remove_reader(connection.fileno())
    future.set_result(message if isinstance(message, tuple) else None)


async def _unless_stopped(work: Awaitable[object], stop: asyncio.Event) -> bool:
    """Runs `work` unless `stop` comes first (then cancels it). Whether it finished; its exception propagates."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False
    task.result()
    return True


async def serve_fronts(config: Config, *, log_format: str = "text") -> None:
    """The parent of N front processes: runs until SIGTERM or SIGINT, then drains the fronts, then the engines."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    host = config.server.host
    reserved = _reserve_port(host, config.server.port)
    port = int(reserved.getsockname()[1])
    front_config = dataclasses.replace(config, server=dataclasses.replace(config.server, port=port, metrics_port=0))
    if config.server.metrics_port:
        logger.warning("--metrics-port is not served with --front-processes > 1 (one port cannot be N fronts')")
    engines = [
        EngineProcess(config, device, name=f"engine-{index}", shared=True)
        for index, device in enumerate(engine_devices(config))
    ]
    fronts: list[_Front] = []
    try:
        try:
            started = await _unless_stopped(asyncio.gather(*(engine.start() for engine in engines)), stop_requested)
        except RuntimeError as exc:
            cause = exc.__cause__
            if isinstance(cause, AsrError):
                message = f"cannot load --model {config.model.model!r}: {cause}"
                raise StartupError(message, exit_code=EXIT_MODEL) from exc
            raise
        if not started:
            return
        addresses = tuple(engine.serve_address for engine in engines)
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        stop_after_s = config.server.grace_period_s + STOP_MARGIN_S
        for index in range(config.server.front_processes):
            spec = FrontSpec(front_config, index, addresses, os.getpid(), str(level), log_format)
            fronts.append(_Front(spec, stop_after_s))
        for front in fronts:
            front.start()
        if not await _unless_stopped(asyncio.gather(*(front.first_ready for front in fronts)), stop_requested):
            return
        pids = ", ".join(str(front.pid) for front in fronts)
        logger.info("%d front processes serving (pids %s)", len(fronts), pids)
        print(f"asr-server: serving {engines[0].model_id} on port {port} ({len(fronts)} front processes)", flush=True)
        await stop_requested.wait()
        logger.info("shutting down: the front processes drain, then the engine processes stop")
    finally:
        # Fronts first: their in-flight calls still need the engines.
        await asyncio.gather(*(front.stop() for front in fronts))
        await asyncio.gather(*(engine.stop() for engine in engines))
        reserved.close()
