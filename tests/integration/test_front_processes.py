"""Several gRPC front processes on one port (--front-processes 2, fake engine, a real `asr-server serve`): calls
land on both fronts (each access line names the front's pid), kill -9 of one front leaves the other's calls and
connections intact while the parent starts a new front, and SIGTERM exits 0 leaving no process behind."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import psutil
import pytest

from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import tone, wav_bytes

pytestmark = pytest.mark.slow

_ACCESS = re.compile(r"\[front-(\d+) pid (\d+)\]: rpc .*code=(\w+).*request_id=(\S+)")
_SERVING = re.compile(r"front (\d+) \(pid (\d+)\) serving on port")


class _Server:
    """`asr-server serve --front-processes 2` in a subprocess, its stderr collected line by line."""

    def __init__(self, tmp_path: Any, *extra: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "asr_server.cli", "serve", "--engine", "fake", "--front-processes", "2",
             "--host", "127.0.0.1", "--port", "0", "--no-warmup", "--grace-period-s", "5", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    async def started(self) -> int:
        line = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), 60)  # type: ignore[union-attr]
        match = re.search(r"on port (\d+) \(2 front processes\)", line)
        assert match, (line, "".join(self.lines))
        self.port = int(match.group(1))
        return self.port

    def fronts(self) -> dict[int, int]:
        """Front index -> pid of its newest process, from the fronts' own "serving" lines."""
        found: dict[int, int] = {}
        for line in list(self.lines):
            match = _SERVING.search(line)
            if match:
                found[int(match.group(1))] = int(match.group(2))
        return found

    def served_by(self) -> dict[str, tuple[int, str]]:
        """request id -> (pid of the front whose access line it is, status code)."""
        found: dict[str, tuple[int, str]] = {}
        for line in list(self.lines):
            match = _ACCESS.search(line)
            if match:
                found[match.group(4)] = (int(match.group(2)), match.group(3))
        return found

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)


@pytest.fixture
def server(tmp_path: Any) -> Iterator[Callable[..., _Server]]:
    started: list[_Server] = []

    def start(*extra: str) -> _Server:
        started.append(_Server(tmp_path, *extra))
        return started[-1]

    yield start
    for each in started:
        if each.process.poll() is None:
            for child in each.descendants():
                child.kill()
            each.process.kill()
            each.process.wait()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def until(condition: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.02)


def channels(port: int, count: int) -> list[grpc.aio.Channel]:
    # One connection per channel (a local subchannel pool each): SO_REUSEPORT places connections, not calls.
    return [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count)
    ]


async def transcribe(channel: grpc.aio.Channel, request_id: str, seed: int) -> pb.TranscribeResponse:
    request = pb.TranscribeRequest(audio=wav_bytes(tone(0.6, seed=seed)))
    stub = pb_grpc.AsrServiceStub(channel)
    return await stub.Transcribe(request, metadata=[("x-request-id", request_id)], timeout=30)


async def test_calls_spread_over_both_fronts_and_a_killed_front_costs_only_its_own_calls(
    server: Callable[..., _Server],
) -> None:
    running = server("--fake-batch-delay-ms", "400")
    port = await running.started()
    first = running.fronts()
    assert sorted(first) == [0, 1] and len(set(first.values())) == 2, first
    # The parent, its engine process and its two fronts (multiprocessing's resource tracker beside them).
    engines = [p for p in running.descendants() if p.pid not in first.values() and "spawn_main" in " ".join(p.cmdline())]
    assert len(engines) == 1, [p.cmdline() for p in running.descendants()]

    # Many connections, one call each: every call succeeds, and both fronts serve some of them.
    pool = channels(port, 16)
    replies = await asyncio.gather(*(transcribe(c, f"warm-{i}", i) for i, c in enumerate(pool)))
    assert all(reply.transcripts[0].text for reply in replies)
    await until(lambda: all(f"warm-{i}" in running.served_by() for i in range(16)), what="16 access lines")
    served = running.served_by()
    front_of = {i: served[f"warm-{i}"][0] for i in range(16)}
    assert set(front_of.values()) == set(first.values()), front_of

    # Calls in flight on every connection (each in a 400 ms fake batch), then one front is killed.
    victim_pid, survivor_pid = first[0], first[1]
    calls = [asyncio.ensure_future(transcribe(c, f"during-{i}", 100 + i)) for i, c in enumerate(pool)]
    os.kill(victim_pid, signal.SIGKILL)
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for i, outcome in enumerate(outcomes):
        if front_of[i] == survivor_pid:
            # The surviving front's calls complete, on connections that stayed up.
            assert isinstance(outcome, pb.TranscribeResponse) and outcome.transcripts[0].text, outcome
        elif not isinstance(outcome, pb.TranscribeResponse):
            # The killed front's own calls: lost with their connection, retryable.
            assert isinstance(outcome, grpc.aio.AioRpcError), outcome
            assert outcome.code() == grpc.StatusCode.UNAVAILABLE, outcome
    assert not alive(victim_pid)
    assert alive(survivor_pid)
    assert all(alive(engine.pid) for engine in engines)  # the engine process is the fronts' shared one: untouched

    # The parent starts a new front 0 on the port; then every new connection is served, by either front.
    await until(lambda: running.fronts().get(0) not in (None, victim_pid), what="front 0 restarted")
    restarted = running.fronts()[0]
    for channel in pool:
        await channel.close()
    fresh = channels(port, 16)
    replies = await asyncio.gather(*(transcribe(c, f"after-{i}", 200 + i) for i, c in enumerate(fresh)))
    assert all(reply.transcripts[0].text for reply in replies)
    await until(lambda: all(f"after-{i}" in running.served_by() for i in range(16)), what="16 more access lines")
    after = {running.served_by()[f"after-{i}"][0] for i in range(16)}
    assert after <= {restarted, survivor_pid}, after
    for channel in fresh:
        await channel.close()

    # SIGTERM: the fronts drain, the engine stops, the parent exits 0, and nothing is left behind.
    everyone = running.descendants()
    running.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(asyncio.to_thread(running.process.wait), 40) == 0
    await until(lambda: not any(alive(p.pid) for p in everyone), timeout_s=10.0, what="no process left")


async def test_two_fronts_links_share_one_engine_process_and_see_its_restart() -> None:
    # In this process: one shared engine process (as the parent runs it) and two links to it (as two fronts hold).
    from asr_server.config import Config, EngineConfig, ServerConfig
    from asr_server.engine.process.client import EngineProcess, RestartPolicy
    from asr_server.engine.process.link import EngineLink
    from asr_server.engine.types import DecodeOptions, DecodeRequest
    from asr_server.errors import Unavailable

    config = Config(
        server=ServerConfig(host="127.0.0.1", port=0, front_processes=2),
        engine=EngineConfig(kind="fake", max_batch_wait_ms=20.0, warmup=False, fake_batch_delay_ms=300.0),
    )
    engine = EngineProcess(config, "cpu", policy=RestartPolicy(backoff_initial_s=0.1), shared=True)
    await engine.start()
    links = [EngineLink(engine.serve_address, name=f"front-{i}") for i in range(2)]
    try:
        await asyncio.wait_for(asyncio.gather(*(link.start() for link in links)), 10)
        first_pid = engine.pid
        assert first_pid is not None and all(link.pid == first_pid for link in links)
        audio = tone(1.0, seed=3)

        def request(request_id: str) -> DecodeRequest:
            return DecodeRequest(request_id, audio, DecodeOptions(None, "", 8))

        # The same request id from both fronts: each answer goes back to the front that asked (by identity).
        alone = await links[0].decode(request("same"))
        both = await asyncio.gather(*(link.decode(request("same")) for link in links))
        assert [r.text for r in both] == [alone.text, alone.text] and all(r.request_id == "same" for r in both)

        # kill -9 of the engine mid-batch: both fronts fail what they held UNAVAILABLE within 2 s, leave "ready",
        # and take the restarted engine (a new pid, the same path) once it is ready.
        held = [asyncio.ensure_future(link.decode(request(f"held-{i}"))) for i, link in enumerate(links)]
        await until(lambda: all(link.in_flight == 1 for link in links), what="both requests sent")
        killed_s = time.monotonic()
        os.kill(first_pid, signal.SIGKILL)
        outcomes = await asyncio.wait_for(asyncio.gather(*held, return_exceptions=True), 5)
        assert time.monotonic() - killed_s < 2.0
        assert all(isinstance(outcome, Unavailable) for outcome in outcomes), outcomes
        await until(
            lambda: all(link.state == "ready" and link.pid not in (None, first_pid) for link in links),
            what="both links on the restarted engine",
        )
        assert all(link.losses == 1 for link in links)
        again = await asyncio.gather(*(link.decode(request("again")) for link in links))
        assert [r.text for r in again] == [alone.text, alone.text]
    finally:
        await asyncio.gather(*(link.stop() for link in links))
        await engine.stop()
    assert all(link.state == "stopped" for link in links)


async def test_the_engine_drops_the_requests_of_a_front_that_went_silent() -> None:
    from asr_server.config import Config, EngineConfig, ServerConfig
    from asr_server.engine.process.client import EngineProcess
    from asr_server.engine.process.link import EngineLink
    from asr_server.engine.types import DecodeOptions, DecodeRequest

    config = Config(
        server=ServerConfig(host="127.0.0.1", port=0, front_processes=2),
        engine=EngineConfig(kind="fake", max_batch_wait_ms=20.0, warmup=False, fake_batch_delay_ms=8_000.0),
    )
    engine = EngineProcess(config, "cpu", shared=True)
    await engine.start()
    dying, watching = EngineLink(engine.serve_address, name="dying"), EngineLink(engine.serve_address, name="watching")
    try:
        await asyncio.gather(dying.start(), watching.start())
        held = asyncio.ensure_future(dying.decode(DecodeRequest("long", tone(1.0, seed=1), DecodeOptions(None, "", 8))))

        async def engine_holds() -> int:
            return (await watching.stats()).in_flight

        deadline = time.monotonic() + 10
        while await engine_holds() != 1:
            assert time.monotonic() < deadline, "the request never reached the engine"
            await asyncio.sleep(0.02)
        # As a killed front: its socket is gone without an Abort, and its heartbeat stops.
        for task in dying._tasks:
            task.cancel()
        assert dying._context is not None
        dying._context.destroy(linger=0)
        killed_s = time.monotonic()
        while await engine_holds() != 0:
            assert time.monotonic() - killed_s < 5, "the silent front's request is still decoding"
            await asyncio.sleep(0.05)
        held.cancel()
    finally:
        await watching.stop()
        await engine.stop()
