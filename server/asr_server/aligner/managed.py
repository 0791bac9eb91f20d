"""The aligner as the main server uses it: a sidecar client plus, in spawn mode, its supervisor."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from asr_server.aligner.client import SidecarClient
from asr_server.aligner.supervisor import SidecarSupervisor
from asr_server.config import AlignerConfig
from asr_server.errors import FailedPrecondition
from asr_server.transcription import AlignmentResult

logger = logging.getLogger(__name__)

# The main server's health service reports the word-timestamp feature under this name: SERVING while the server
# serves and the aligner is up, NOT_SERVING otherwise, NOT_FOUND on a server started without an aligner.
WORD_TIMESTAMPS_HEALTH_SERVICE = "qwenasr.v1.AsrService.WordTimestamps"

# Longest a request waits for a (re)starting sidecar before UNAVAILABLE; loading the 0.6B aligner takes seconds.
DEFAULT_READY_WAIT_S = 30.0
# Unix socket paths are limited to 107 bytes.
_MAX_SOCKET_PATH = 100


def sidecar_command(
    config: AlignerConfig, address: str, extra_args: Sequence[str] = (), *, failure_file: Path | None = None
) -> list[str]:
    """The command line of a spawned sidecar: this interpreter, so the child runs the same installation."""
    command = [
        sys.executable,
        "-m",
        "asr_server.cli",
        "aligner",
        "--model",
        config.model,
        "--listen",
        address,
        "--dtype",
        config.dtype,
        "--device",
        config.device,
        "--max-batch-size",
        str(config.max_batch_size),
        "--max-batch-wait-ms",
        str(config.max_batch_wait_ms),
        "--exit-with-parent",
    ]
    if failure_file is not None:
        command += ["--failure-file", str(failure_file)]
    return command + list(extra_args)


@runtime_checkable
class ManagedAligner(Protocol):
    """An AlignBackend whose lifecycle the server drives and whose readiness it reports."""

    @property
    def ready(self) -> bool: ...

    def add_listener(self, listener: Callable[[bool], None]) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def align(self, audio_16k: npt.NDArray[np.float32], text: str, language: str) -> AlignmentResult: ...


class SidecarAligner:
    """AlignBackend with a lifecycle: start, stop, readiness and its changes."""

    def __init__(
        self,
        config: AlignerConfig,
        *,
        ready_wait_s: float = DEFAULT_READY_WAIT_S,
        extra_sidecar_args: Sequence[str] = (),
        start_timeout_s: float = 900.0,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.config = config
        self._socket_dir: Path | None = None
        address = config.address
        if config.mode == "spawn" and not address:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="asr-aligner-"))
            socket = self._socket_dir / "aligner.sock"
            if len(str(socket)) > _MAX_SOCKET_PATH:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
                self._socket_dir = Path(tempfile.mkdtemp(prefix="asr-aligner-", dir="/tmp"))
                socket = self._socket_dir / "aligner.sock"
            address = f"unix://{socket}"
        self.address = address
        self.supervisor: SidecarSupervisor | None = None
        self.client = SidecarClient(
            address,
            timeout_s=config.timeout_s,
            ready_wait_s=min(ready_wait_s, config.timeout_s),
            poll_interval_s=poll_interval_s,
            describe_down=self._describe_down,
        )
        if config.mode == "spawn":
            if self._socket_dir is None:
                self._socket_dir = Path(tempfile.mkdtemp(prefix="asr-aligner-"))
            failure_file = self._socket_dir / "failure.txt"
            self.supervisor = SidecarSupervisor(
                sidecar_command(config, address, extra_sidecar_args, failure_file=failure_file),
                is_ready=lambda: self.client.ready,
                on_exit=lambda _code: self.client.sidecar_down(),
                start_timeout_s=start_timeout_s,
                failure_file=failure_file,
            )

    @property
    def ready(self) -> bool:
        return self.client.ready

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        self.client.add_listener(listener)

    async def start(self) -> None:
        """Starts the sidecar (spawn mode) and the readiness watch; does not wait for the model to load."""
        if self.supervisor is not None:
            await self.supervisor.start()
        await self.client.start()
        logger.info("forced aligner %s (%s mode) at %s", self.config.model, self.config.mode, self.address)

    async def stop(self) -> None:
        await self.client.stop()
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    async def align(self, audio_16k: npt.NDArray[np.float32], text: str, language: str) -> AlignmentResult:
        supervisor = self.supervisor
        if supervisor is None:
            return await self.client.align(audio_16k, text, language)
        self._raise_if_failed(supervisor)
        # A request waiting for a sidecar that then fails for good is answered at once, not at the ready wait's end.
        aligning = asyncio.ensure_future(self.client.align(audio_16k, text, language))
        failing = asyncio.ensure_future(supervisor.failed.wait())
        try:
            await asyncio.wait({aligning, failing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            failing.cancel()
            if not aligning.done():
                aligning.cancel()
        if aligning.done() and not aligning.cancelled():
            return aligning.result()
        self._raise_if_failed(supervisor)
        return await aligning  # pragma: no cover - cancelled only with the call itself

    def _raise_if_failed(self, supervisor: SidecarSupervisor) -> None:
        if supervisor.failed.is_set():
            raise FailedPrecondition(
                f"word timestamps are unavailable: the forced aligner could not load its model "
                f"(--aligner-model {self.config.model!r}: {supervisor.failure}); restarting will not help until "
                "the server is restarted with a working --aligner-model; request without return_word_timestamps"
            )

    def _describe_down(self) -> str:
        if self.supervisor is not None:
            return f"sidecar {self.supervisor.describe()}"
        return f"nothing SERVING at {self.address}"
