"""Spawn mode: the main server starts the sidecar as a child process and keeps it running.

A child that exits (crash, OOM kill, SIGKILL) is started again after a backoff that doubles from 0.5 s up to 30 s
and falls back to 0.5 s once a child has stayed up for a minute. A child that does not report SERVING within
start_timeout_s is killed and restarted. On stop the child gets SIGTERM, then SIGKILL after a grace period; and
since a supervisor killed with SIGKILL cannot stop it, the child is started with --exit-with-parent.

A child that exits with EXIT_ALIGNER_MODEL before it was ever ready could not load its model (a bad path, not an
aligner checkpoint): restarting cannot help, so it is not restarted. The supervisor is then `failed`, with the line
the child wrote to its --failure-file as `failure`, logged once; the aligner answers timestamp requests
FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# `asr-server aligner` exits with this when its model cannot be loaded (cli.py): a permanent failure.
EXIT_ALIGNER_MODEL = 4
# Most of a failure file read (one line is written).
_MAX_FAILURE_CHARS = 2000


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class SidecarSupervisor:
    def __init__(
        self,
        command: Sequence[str],
        *,
        is_ready: Callable[[], bool],
        on_exit: Callable[[int], None],
        start_timeout_s: float = 900.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        stable_after_s: float = 60.0,
        stop_grace_s: float = 10.0,
        failure_file: Path | None = None,
    ) -> None:
        self._command = list(command)
        # Where the child writes why it could not load its model (its --failure-file).
        self._failure_file = failure_file
        self._is_ready = is_ready
        self._on_exit = on_exit
        self._start_timeout_s = start_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._stable_after_s = stable_after_s
        self._stop_grace_s = stop_grace_s
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.starts = 0
        self.last_exit = ""
        self.state = "new"
        # Set when the child cannot ever start (its model does not load); `failure` says why.
        self.failed = asyncio.Event()
        self.failure = ""

    @property
    def restarts(self) -> int:
        """Times the child was started again after it went down."""
        return max(self.starts - 1, 0)

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def describe(self) -> str:
        parts = [self.state]
        if self.starts > 1:
            parts.append(f"restart {self.starts - 1}")
        if self.last_exit:
            parts.append(f"last exit: {self.last_exit}")
        return ", ".join(parts)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stopping.set()
        process = self._process
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=self._stop_grace_s)
            except TimeoutError:
                logger.warning("aligner sidecar (pid %d) ignored SIGTERM; killing it", process.pid)
                process.kill()
                await process.wait()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.state = "stopped"

    async def _run(self) -> None:
        backoff = self._backoff_initial_s
        while not self._stopping.is_set():
            started = time.monotonic()
            self.starts += 1
            self.state = "starting"
            ever_ready = False
            try:
                process = await asyncio.create_subprocess_exec(*self._command, stdin=asyncio.subprocess.DEVNULL)
            except OSError as exc:
                logger.error("cannot start the aligner sidecar (%s): %s", " ".join(self._command[:4]), exc)
                self.last_exit = f"could not start: {exc}"
                returncode = None
            else:
                self._process = process
                logger.info("aligner sidecar started (pid %d)", process.pid)
                returncode, ever_ready = await self._watch(process, started)
                self.last_exit = describe_exit(returncode)
                self._on_exit(returncode)
            if self._stopping.is_set():
                return
            if returncode == EXIT_ALIGNER_MODEL and not ever_ready:
                self.state = "failed"
                self.failure = await asyncio.to_thread(self._read_failure) or self.last_exit
                logger.error(
                    "aligner sidecar cannot load its model, not restarting it: %s; word timestamps answer "
                    "FAILED_PRECONDITION until the server is restarted with a working --aligner-model",
                    self.failure,
                )
                self.failed.set()
                return
            if time.monotonic() - started >= self._stable_after_s:
                backoff = self._backoff_initial_s
            self.state = "restarting"
            logger.warning("aligner sidecar %s; restarting in %.1f s", self.last_exit, backoff)
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=backoff)
                return
            except TimeoutError:
                pass
            backoff = min(backoff * 2, self._backoff_max_s)

    def _read_failure(self) -> str:
        if self._failure_file is None:
            return ""
        try:
            return self._failure_file.read_text(errors="replace")[:_MAX_FAILURE_CHARS].strip()
        except OSError as exc:
            logger.warning("cannot read the aligner sidecar's failure file %s: %s", self._failure_file, exc)
            return ""

    async def _watch(self, process: asyncio.subprocess.Process, started: float) -> tuple[int, bool]:
        """The child's exit status, once it exits, and whether it was ever ready."""
        ever_ready = False
        while True:
            try:
                return await asyncio.wait_for(process.wait(), timeout=0.5), ever_ready
            except TimeoutError:
                pass
            if self._is_ready():
                if not ever_ready:
                    ever_ready = True
                    self.state = "ready"
            elif ever_ready:
                self.state = "not serving"
            elif time.monotonic() - started > self._start_timeout_s:
                logger.error(
                    "aligner sidecar (pid %d) not SERVING after %.0f s; killing it", process.pid, self._start_timeout_s
                )
                process.kill()
