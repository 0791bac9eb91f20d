"""The sidecar supervisor's restart policy, with stand-in child processes (no model)."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

from asr_server.aligner.supervisor import SidecarSupervisor, describe_exit


async def test_a_child_that_exits_is_restarted_with_growing_backoff() -> None:
    exits: list[tuple[float, int]] = []
    supervisor = SidecarSupervisor(
        [sys.executable, "-c", "import sys; sys.exit(3)"],
        is_ready=lambda: False,
        on_exit=lambda code: exits.append((time.monotonic(), code)),
        backoff_initial_s=0.1,
        backoff_max_s=0.4,
    )
    await supervisor.start()
    deadline = time.monotonic() + 30
    while len(exits) < 4 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await supervisor.stop()
    assert len(exits) >= 4 and all(code == 3 for _, code in exits)
    gaps = [b - a for (a, _), (b, _) in zip(exits, exits[1:], strict=False)]
    # Each gap is the backoff (0.1, 0.2, 0.4, capped) plus the child's start-up.
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4
    assert supervisor.last_exit == "exited with status 3" and supervisor.state == "stopped"


async def test_a_child_that_never_becomes_ready_is_killed_and_restarted() -> None:
    exits: list[int] = []
    supervisor = SidecarSupervisor(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        is_ready=lambda: False,
        on_exit=exits.append,
        start_timeout_s=0.5,
        backoff_initial_s=0.05,
    )
    await supervisor.start()
    deadline = time.monotonic() + 30
    while supervisor.starts < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await supervisor.stop()
    assert exits and exits[0] == -9 and supervisor.starts >= 2
    assert "killed by SIGKILL" in describe_exit(exits[0])


async def test_stop_terminates_a_running_child() -> None:
    exits: list[int] = []
    supervisor = SidecarSupervisor(
        [sys.executable, "-c", "import time; time.sleep(60)"], is_ready=lambda: True, on_exit=exits.append
    )
    await supervisor.start()
    deadline = time.monotonic() + 30
    while supervisor.pid is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    pid = supervisor.pid
    assert pid is not None
    await asyncio.sleep(0.6)  # one readiness check
    assert supervisor.state == "ready"
    await supervisor.stop()
    assert supervisor.pid is None and supervisor.starts == 1
    assert exits in ([-15], [])  # SIGTERM; the exit report may race with the end of the supervision task


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                status = (entry / "status").read_text()
            except OSError:
                continue
            if marker.encode() in cmdline and "State:\tZ" not in status:
                found.append(int(entry.name))
    return found


async def test_stop_while_the_child_is_being_spawned_leaves_no_orphan() -> None:
    # Stop lands at different points of the spawn (before the fork, inside create_subprocess_exec, just after):
    # the child must be ended every time, or it would hold the aligner's GPU memory after the server exits.
    # (A cancelled create_subprocess_exec closes the transport it made, which kills the child; this pins that.)
    for attempt in range(5):
        marker = f"orphan-check-{uuid.uuid4().hex}"
        supervisor = SidecarSupervisor(
            [sys.executable, "-c", "import time, sys; time.sleep(60)", marker], is_ready=lambda: False, on_exit=print
        )
        await supervisor.start()
        await asyncio.sleep(attempt * 0.002)
        await asyncio.wait_for(supervisor.stop(), 15)
        assert supervisor.state == "stopped"
        await asyncio.sleep(0.2)
        assert _processes_with(marker) == [], f"attempt {attempt}: child outlived stop()"
