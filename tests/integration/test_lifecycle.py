"""Health across start and shutdown; a call in flight at SIGTERM completes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from asr_server.edge import server as server_module
from asr_server.edge.server import AsrServer
from asr_server.engine.fake import FakeEngine
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, wav_bytes

Status = health_pb2.HealthCheckResponse


async def watch_statuses(channel: grpc.aio.Channel, seen: list[int]) -> None:
    async for update in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="")):
        if not seen or seen[-1] != update.status:
            seen.append(update.status)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def test_health_is_not_serving_until_loaded_then_serving_then_not_serving_on_stop() -> None:
    release = threading.Event()

    def slow_load() -> FakeEngine:
        release.wait(10)
        return FakeEngine(max_batch_size=4, batch_delay_ms=600)

    server = AsrServer(fake_config(), core_factory=slow_load)
    starting = asyncio.create_task(server.start())
    while server.port == 0:
        await asyncio.sleep(0.01)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    seen: list[int] = []
    watcher = asyncio.create_task(watch_statuses(channel, seen))
    stub = pb_grpc.AsrServiceStub(channel)
    await wait_until(lambda: bool(seen))
    assert seen == [Status.NOT_SERVING]
    # Calls before the model is up are told to retry, not queued forever.
    try:
        await stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0))))
        raise AssertionError("expected UNAVAILABLE")
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    release.set()
    await starting
    await wait_until(lambda: len(seen) >= 2)
    assert seen == [Status.NOT_SERVING, Status.SERVING]
    in_flight = asyncio.ensure_future(stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0, seed=1)))))
    await wait_until(lambda: server.in_flight_calls == 1)
    await server.stop(grace_s=5.0)
    response = await in_flight
    assert response.transcripts[0].text
    assert seen == [Status.NOT_SERVING, Status.SERVING, Status.NOT_SERVING]
    watcher.cancel()
    await channel.close()


async def test_sigterm_lets_the_call_in_flight_finish_and_exits_cleanly() -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asr_server.cli",
            "serve",
            "--engine",
            "fake",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--fake-batch-delay-ms",
            "1500",
            "--grace-period-s",
            "10",
            "--no-warmup",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60)  # type: ignore[union-attr]
        match = re.search(r"on port (\d+)", line)
        if match is None:
            process.kill()
            raise AssertionError(f"no port line: {line!r}; server stderr:\n{process.communicate()[1][-4000:]}")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{match.group(1)}")
        seen: list[int] = []
        watcher = asyncio.create_task(watch_statuses(channel, seen))
        stub = pb_grpc.AsrServiceStub(channel)
        in_flight = asyncio.ensure_future(stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0, seed=2)))))
        await wait_until(lambda: bool(seen))
        await asyncio.sleep(0.4)  # the call reaches the server (its batch takes 1.5 s)
        assert seen == [Status.SERVING]
        process.send_signal(signal.SIGTERM)
        response = await in_flight
        assert response.transcripts[0].text
        for _ in range(500):
            if Status.NOT_SERVING in seen[1:]:
                break
            await asyncio.sleep(0.01)
        assert Status.NOT_SERVING in seen[1:], seen
        # The Watch stays open: shutdown ends it once the ASR call is done instead of waiting out the 10 s grace.
        sigterm_to_exit_s = time.monotonic()
        assert await asyncio.wait_for(asyncio.to_thread(process.wait), 30) == 0
        sigterm_to_exit_s = time.monotonic() - sigterm_to_exit_s
        assert sigterm_to_exit_s < 5.0, sigterm_to_exit_s
        watcher.cancel()
        await channel.close()
    finally:
        if process.poll() is None:
            process.kill()


async def test_health_check_answers_not_serving_through_the_whole_drain_while_a_call_runs() -> None:
    # One batch takes 2 s: the call is still running while the drain is checked.
    async with running_server(fake_config(fake_batch_delay_ms=2000)) as (server, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        health_stub = health_pb2_grpc.HealthStub(channel)
        in_flight = asyncio.ensure_future(stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0, seed=3)))))
        await wait_until(lambda: server.in_flight_calls == 1)
        stopping = asyncio.create_task(server.stop(grace_s=10.0))
        await wait_until(lambda: server._stopping)
        # A call arriving in the drain is refused with retry advice, not left to queue.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(0.5))))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (refused.value.details() or "")
        assert rpc_status.from_call(refused.value) is not None  # RetryInfo in the details
        assert not in_flight.done()
        checks = 0
        while server.in_flight_calls:
            for service in ("", "qwenasr.v1.AsrService"):
                try:
                    answer = await health_stub.Check(health_pb2.HealthCheckRequest(service=service))
                except grpc.aio.AioRpcError:
                    # Only once the call is done does the server close: a Check racing that moment may be cut.
                    assert server.in_flight_calls == 0
                    break
                assert answer.status == Status.NOT_SERVING, (service, answer)
                checks += 1
            await asyncio.sleep(0.05)
        assert checks >= 10, checks  # the drain was checked over most of the call's 2 s
        response = await in_flight
        assert response.transcripts[0].text
        await stopping


async def test_serving_only_once_the_vad_has_made_its_first_passes() -> None:
    """A fresh server reported SERVING while Silero was still loading and making torch's slow first passes: its
    first live streams got their interims seconds late (3.4 s with the fake engine). Start waits for it now."""
    server = AsrServer(fake_config())
    await server.start()
    try:
        vad = server._servicer._vad  # type: ignore[union-attr]
        assert vad._preloaded is not None and vad._preloaded.done() and vad._preloaded.exception() is None
        assert server._serving
    finally:
        await server.stop(grace_s=1.0)


async def test_a_process_entry_point_freezes_the_heap_once_loaded_and_before_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Full collections over the loaded heap stopped the engine process 380-500 ms every 7-9 s under 256 live streams
    (H200); entry points freeze the start-up heap. It must happen after the engine and the VAD are loaded (what
    they allocate is what gets frozen) and before health says SERVING (the collection blocks the loop)."""
    calls: list[tuple[str, bool, bool]] = []

    def record(process: str) -> int:
        vad = server._servicer._vad  # type: ignore[union-attr]
        calls.append((process, vad._preloaded is not None and vad._preloaded.done(), server._serving))
        return 0

    monkeypatch.setattr(server_module, "freeze_startup_heap", record)
    server = AsrServer(fake_config(), freeze_heap=True)
    await server.start()
    try:
        assert calls == [("front", True, False)]
        assert server._serving
    finally:
        await server.stop(grace_s=1.0)
    # Servers started by tests (many in one process) never freeze: frozen cycles are never collected.
    calls.clear()
    plain = AsrServer(fake_config())
    await plain.start()
    await plain.stop(grace_s=1.0)
    assert calls == []
