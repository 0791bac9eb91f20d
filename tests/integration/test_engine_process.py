"""The engine core in its own process (--engine-process on), through the real gRPC server on port 0: the same
transcripts as in-process (fake engine; tiny checkpoint token for token), a killed engine process failing its
callers UNAVAILABLE within 2 s with health NOT_SERVING until the supervisor's restart is ready, cancellation
reaching the engine process, and no engine process left after stop or after its front is killed."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr_server.config import Config, ContinuousConfig, EngineConfig, ModelConfig
from asr_server.engine.process.client import EngineProcess
from asr_server.engine.runner import EngineRunner
from asr_server.engine.types import DecodeOptions, DecodeRequest
from asr_server.models.tiny_checkpoint import TinyCheckpoints
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, wav_bytes
from tests.integration.test_rpc_errors import retry_info

Status = health_pb2.HealthCheckResponse
FLOAT32_16K = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_FLOAT32, sample_rate_hz=16000, channel_count=1)
MAX_NEW_TOKENS = 16


def in_process(config: Config, mode: str) -> Config:
    return dataclasses.replace(config, engine=dataclasses.replace(config.engine, process=mode))


async def until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.01)


async def until_async(condition: Callable[[], Any], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.01)


async def health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    return int(reply.status)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def transcribe_all(config: Config, requests: list[pb.TranscribeRequest]) -> list[tuple[str, str]]:
    async with running_server(config) as (server, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        responses = await asyncio.gather(*(stub.Transcribe(r) for r in requests))
        expect_process = config.engine.process == "on"
        assert isinstance(server.engine, EngineProcess) == expect_process
    return [(r.transcripts[0].text, r.transcripts[0].language) for r in responses]


async def test_the_fake_engine_gives_the_same_transcripts_through_the_engine_process() -> None:
    requests = [pb.TranscribeRequest(audio=wav_bytes(tone(0.5 + i * 0.7, seed=i))) for i in range(12)]
    config = fake_config(max_inference_batch_size=4)
    inside = await transcribe_all(in_process(config, "off"), requests)
    across = await transcribe_all(in_process(config, "on"), requests)
    assert across == inside
    assert all(text for text, _ in across)


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    voiced = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) * (1 + np.sin(2 * np.pi * rng.uniform(2, 6) * t))
    return (voiced + 0.02 * rng.standard_normal(n)).astype(np.float32)


def _tiny_config(model: str, kind: str) -> Config:
    engine: dict[str, Any] = {"kind": kind, "max_batch_wait_ms": 20.0, "max_inference_batch_size": 8, "warmup": False}
    if kind == "continuous":
        engine["continuous"] = ContinuousConfig(max_running=4, kv_cache_tokens=8192)
    return dataclasses.replace(
        fake_config(), model=ModelConfig(model=model, device="cpu", dtype="float32"), engine=EngineConfig(**engine)
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["transformers", "continuous"])
async def test_the_tiny_checkpoint_gives_the_same_tokens_through_the_engine_process(
    tiny_checkpoints: TinyCheckpoints, kind: str
) -> None:
    clips = [_speechlike(s, seed=40 + i) for i, s in enumerate([0.4, 2.2, 1.1, 3.5, 0.8, 1.7])]
    options = [DecodeOptions(["English", None][i % 2], ["", "hotwords: Qwen"][(i // 2) % 2], MAX_NEW_TOKENS) for i in range(6)]
    tokens: dict[str, list[tuple[int, ...]]] = {}
    texts: dict[str, list[str]] = {}
    for mode in ("off", "on"):
        config = in_process(_tiny_config(str(tiny_checkpoints.asr_hf), kind), mode)
        async with running_server(config) as (server, channel):
            engine = server.engine
            assert isinstance(engine, EngineProcess if mode == "on" else EngineRunner)
            results = await asyncio.gather(
                *(engine.decode(DecodeRequest(f"{mode}-{i}", c, o)) for i, (c, o) in enumerate(zip(clips, options, strict=True)))
            )
            tokens[mode] = [r.token_ids for r in results]
            stub = pb_grpc.AsrServiceStub(channel)
            responses = await asyncio.gather(
                *(
                    stub.Transcribe(
                        pb.TranscribeRequest(
                            config=pb.RecognitionConfig(audio_format=FLOAT32_16K, max_new_tokens=MAX_NEW_TOKENS),
                            audio=c.astype("<f4").tobytes(),
                        )
                    )
                    for c in clips
                )
            )
            texts[mode] = [r.transcripts[0].text for r in responses]
    assert tokens["on"] == tokens["off"]
    assert all(tokens["on"])
    assert texts["on"] == texts["off"]


async def test_kill_9_of_the_engine_process_fails_its_callers_unavailable_then_health_comes_back() -> None:
    config = in_process(fake_config(fake_batch_delay_ms=5000.0, max_inference_batch_size=8), "on")
    async with running_server(config) as (server, channel):
        engine = server.engine
        assert isinstance(engine, EngineProcess)
        first_pid = engine.pid
        assert first_pid is not None and first_pid != os.getpid()
        assert await health(channel) == Status.SERVING
        stub = pb_grpc.AsrServiceStub(channel)
        calls = [
            asyncio.ensure_future(stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0, seed=i)))))
            for i in range(4)
        ]

        async def all_in_the_engine() -> bool:
            return (await engine.stats()).in_flight == 4

        await until_async(all_in_the_engine, what="the 4 calls to reach the engine process")
        killed_s = time.monotonic()
        os.kill(first_pid, signal.SIGKILL)
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5.0)
        failed_after_s = time.monotonic() - killed_s
        assert failed_after_s < 2.0, failed_after_s
        for outcome in outcomes:
            assert isinstance(outcome, grpc.aio.AioRpcError), outcome
            assert outcome.code() == grpc.StatusCode.UNAVAILABLE, outcome
            assert "engine process went down" in (outcome.details() or "")
            info = retry_info(outcome)
            assert info is not None and info.retry_delay.ToTimedelta().total_seconds() > 0
        assert await health(channel) == Status.NOT_SERVING
        # Refused while it restarts, retryably, never queued for a process that is not there.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(0.5, seed=9))))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        async def serving() -> bool:
            return await health(channel) == Status.SERVING

        await until_async(serving, timeout_s=30.0, what="SERVING after the restart")
        assert engine.pid not in (None, first_pid)
        assert engine.starts == 2
        assert not alive(first_pid)
    assert engine.state == "stopped"


async def test_a_cancelled_call_is_aborted_in_the_engine_process() -> None:
    config = in_process(fake_config(fake_batch_delay_ms=3000.0), "on")
    async with running_server(config) as (server, channel):
        engine = server.engine
        assert isinstance(engine, EngineProcess)
        call = pb_grpc.AsrServiceStub(channel).Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0, seed=3))))
        waiting = asyncio.ensure_future(call)

        async def in_engine() -> bool:
            return (await engine.stats()).in_flight == 1

        await until_async(in_engine, what="the call to reach the engine process")
        cancelled_s = time.monotonic()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

        async def freed() -> bool:
            stats = await engine.stats()
            return stats.in_flight == 0 and stats.aborted == 1

        # Well before its 3 s batch would have ended: the abort, not the batch's end, freed it.
        await until_async(freed, timeout_s=2.0, what="the engine process to drop the cancelled request")
        assert time.monotonic() - cancelled_s < 2.0
        assert engine.in_flight == 0
        stats = await engine.stats()
        assert stats.finished == 0 and stats.submitted == 1


async def test_stop_leaves_no_engine_process() -> None:
    config = in_process(fake_config(), "on")
    async with running_server(config) as (server, channel):
        engine = server.engine
        assert isinstance(engine, EngineProcess)
        pid = engine.pid
        assert pid is not None and alive(pid)
        response = await pb_grpc.AsrServiceStub(channel).Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0, seed=1))))
        assert response.transcripts[0].text
    assert not alive(pid)
    assert multiprocessing.active_children() == []
    assert engine.state == "stopped"


@pytest.mark.slow
async def test_the_engine_process_exits_when_its_front_is_killed(tmp_path: Any) -> None:
    # The front's socket directory goes under TMPDIR: the orphan removes it, since its killed front cannot.
    env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path))
    front = subprocess.Popen(
        [sys.executable, "-m", "asr_server.cli", "serve", "--engine", "fake", "--engine-process", "on",
         "--host", "127.0.0.1", "--port", "0", "--no-warmup"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(front.stdout.readline), 60)  # type: ignore[union-attr]
        assert re.search(r"on port (\d+)", line), line
        children = psutil.Process(front.pid).children()
        engines = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert len(engines) == 1, [c.cmdline() for c in children]
        front.kill()
        front.wait()
        # The engine process (and multiprocessing's resource tracker beside it) leave without their parent.
        assert len(list(tmp_path.glob("asr-engine-*"))) == 1
        await until(lambda: not any(alive(c.pid) for c in children), timeout_s=10.0, what="the orphans to exit")
        assert list(tmp_path.glob("asr-engine-*")) == []
    finally:
        if front.poll() is None:
            front.kill()


@pytest.mark.slow
async def test_sigterm_drains_the_front_then_stops_the_engine_process() -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    front = subprocess.Popen(
        [sys.executable, "-m", "asr_server.cli", "serve", "--engine", "fake", "--engine-process", "on",
         "--host", "127.0.0.1", "--port", "0", "--no-warmup", "--fake-batch-delay-ms", "1500", "--grace-period-s", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(front.stdout.readline), 60)  # type: ignore[union-attr]
        match = re.search(r"on port (\d+)", line)
        assert match, line
        children = psutil.Process(front.pid).children()
        assert any("spawn_main" in " ".join(c.cmdline()) for c in children)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{match.group(1)}")
        in_flight = asyncio.ensure_future(
            pb_grpc.AsrServiceStub(channel).Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0, seed=2))))
        )
        # The call is in the engine's 1.5 s batch when SIGTERM comes: the front drains it before the core stops.
        await asyncio.sleep(0.4)  # the call reaches the engine process (nothing to await from outside the server)
        assert not in_flight.done()
        front.send_signal(signal.SIGTERM)
        response = await asyncio.wait_for(in_flight, 10)
        assert response.transcripts[0].text
        assert await asyncio.wait_for(asyncio.to_thread(front.wait), 30) == 0
        await until(lambda: not any(alive(c.pid) for c in children), timeout_s=5.0, what="the engine process to exit")
        await channel.close()
    finally:
        if front.poll() is None:
            front.kill()


async def test_two_engine_processes_balance_and_one_killed_leaves_the_other_serving() -> None:
    from asr_server.engine.process.client import RestartPolicy
    from asr_server.engine.replicas import ReplicatedRunner

    config = in_process(fake_config(fake_batch_delay_ms=50.0), "on")
    policy = RestartPolicy(backoff_initial_s=0.2)
    replicas = [EngineProcess(config, "cpu", name=f"engine-{i}", policy=policy) for i in range(2)]
    engine = ReplicatedRunner(replicas)
    changes: list[bool] = []
    engine.add_listener(changes.append)
    await engine.start()
    try:
        assert len({r.pid for r in replicas}) == 2
        audio = tone(1.0, seed=5)
        results = await asyncio.gather(
            *(engine.decode(DecodeRequest(f"r{i}", audio, DecodeOptions(None, "", 8))) for i in range(16))
        )
        assert all(r.text for r in results)
        # Least-loaded balancing: both processes got work.
        finished = [s.finished for s in await asyncio.gather(*(r.stats() for r in replicas))]
        assert all(n > 0 for n in finished) and sum(finished) == 16, finished
        os.kill(replicas[0].pid or 0, signal.SIGKILL)
        await until(lambda: replicas[0].state != "ready", what="replica 0 to be seen dead")
        assert engine.state == "ready" and changes == [True]  # one replica still serves: no NOT_SERVING
        result = await engine.decode(DecodeRequest("after", audio, DecodeOptions(None, "", 8)))
        assert result.text == results[0].text
        await until(lambda: replicas[0].state == "ready", timeout_s=30.0, what="replica 0 restarted")
    finally:
        await engine.stop()
    assert all(r.state == "stopped" for r in replicas)


@pytest.mark.parametrize("mode", ["off", "on"])
async def test_a_full_engine_queue_is_the_same_status_and_message_in_both_modes(mode: str) -> None:
    config = in_process(fake_config(fake_batch_delay_ms=1500.0, max_inference_batch_size=1, max_queued_requests=2), mode)
    async with running_server(config) as (server, channel):
        assert isinstance(server.engine, EngineProcess) == (mode == "on")
        stub = pb_grpc.AsrServiceStub(channel)
        outcomes = await asyncio.gather(
            *(stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0, seed=i)))) for i in range(3)),
            return_exceptions=True,
        )
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(refused) == 1, outcomes
    assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused[0].details() == (
        "the engine queue is full (2 pieces of audio waiting, limit 2); retry with exponential backoff"
    )
    info = retry_info(refused[0])
    assert info is not None and info.retry_delay.ToTimedelta().total_seconds() == 1.0


async def test_a_first_start_that_fails_fails_the_server_start_and_leaves_no_process(tmp_path: Any) -> None:
    config = dataclasses.replace(
        fake_config(),
        model=ModelConfig(model=str(tmp_path / "no-such-model"), device="cpu", dtype="float32"),
        engine=EngineConfig(kind="transformers", warmup=False, process="on"),
    )
    with pytest.raises(RuntimeError, match="engine failed to start: .*no-such-model"):
        async with running_server(config):
            pass
    assert multiprocessing.active_children() == []


async def test_stop_while_the_engine_process_starts_or_waits_to_restart_returns_promptly() -> None:
    from asr_server.engine.process.client import RestartPolicy

    config = in_process(fake_config(), "on")
    loading = EngineProcess(config, "cpu", name="loading")
    starting = asyncio.ensure_future(loading.start())
    await until(lambda: loading.pid is not None, what="the child to be spawned")
    pid = loading.pid
    assert pid is not None
    await asyncio.wait_for(loading.stop(), 15.0)
    await asyncio.wait_for(starting, 1.0)  # start() returns, as an in-process runner's does when stopped
    assert loading.state == "stopped" and not alive(pid)

    waiting = EngineProcess(config, "cpu", name="waiting", policy=RestartPolicy(backoff_initial_s=60.0))
    await waiting.start()
    pid = waiting.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await until(lambda: waiting.state == "failed", what="the kill to be seen")
    stopped_s = time.monotonic()
    await asyncio.wait_for(waiting.stop(), 5.0)
    assert time.monotonic() - stopped_s < 2.0  # not the 60 s backoff
    assert waiting.starts == 1 and waiting.state == "stopped"
    assert multiprocessing.active_children() == []
