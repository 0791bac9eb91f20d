"""Spawn mode: the main server starts the aligner sidecar as a child process and keeps it alive.

Real child processes (`python -m asr_server.cli aligner ...` with the tiny aligner), killed with SIGKILL while loading
and while aligning: the sidecar comes back, requests in flight to it get UNAVAILABLE, requests without timestamps
are not affected, later requests get timestamps again, and no request hangs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr_server.aligner.managed import WORD_TIMESTAMPS_HEALTH_SERVICE, SidecarAligner
from asr_server.config import AlignerConfig, Config
from asr_server.models.tiny_checkpoint import TinyCheckpoints
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone
from tests.integration.test_aligner_sidecar import float32_request, status_of
from tests.integration.test_engine_metrics import scrape, value

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
# Generous for a 2-core CI machine: a child imports torch and transformers before it loads the model.
START_S = 60.0


def spawn_config(tiny_checkpoints: TinyCheckpoints) -> Config:
    aligner = AlignerConfig(model=str(tiny_checkpoints.aligner_hf), mode="spawn", device="cpu", timeout_s=30)
    return dataclasses.replace(fake_config(), aligner=aligner)


async def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


async def word_timestamps_health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=WORD_TIMESTAMPS_HEALTH_SERVICE))
    return int(response.status)


async def test_sidecar_killed_during_load_comes_back_and_no_request_hangs(tiny_checkpoints: TinyCheckpoints) -> None:
    config = spawn_config(tiny_checkpoints)
    aligner = SidecarAligner(
        config.aligner, ready_wait_s=START_S, poll_interval_s=0.1, extra_sidecar_args=["--load-delay-s", "1"]
    )
    assert aligner.supervisor is not None
    supervisor = aligner.supervisor
    samples = tone(2.0, seed=1)
    async with running_server(config, aligner=aligner) as (server, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        await wait_until(lambda: supervisor.pid is not None, 10, "the sidecar is spawned")
        first_pid = supervisor.pid
        assert first_pid is not None and not aligner.ready
        # A request that arrives while the sidecar loads waits for it (bounded by ready_wait_s and the deadline).
        early = asyncio.ensure_future(stub.Transcribe(float32_request(samples, return_word_timestamps=True)))
        await asyncio.sleep(0.3)
        os.kill(first_pid, signal.SIGKILL)  # during its load
        await wait_until(lambda: supervisor.starts >= 2, 10, "the supervisor restarts the sidecar")
        assert "SIGKILL" in supervisor.last_exit
        await wait_until(lambda: aligner.ready, START_S, "the restarted sidecar reports SERVING")
        assert supervisor.pid not in (None, first_pid)

        # The early request did not hang: it was served by the restarted sidecar (or told to retry).
        try:
            response = await asyncio.wait_for(early, timeout=START_S)
            assert response.transcripts[0].word_timestamps_status == pb.WORD_TIMESTAMPS_STATUS_OK
        except grpc.aio.AioRpcError as exc:
            assert status_of(exc)[0] == grpc.StatusCode.UNAVAILABLE

        later = await stub.Transcribe(float32_request(samples, return_word_timestamps=True))
        (transcript,) = later.transcripts
        assert transcript.words and transcript.word_timestamps_status == pb.WORD_TIMESTAMPS_STATUS_OK
        await asyncio.sleep(0.05)
        assert await word_timestamps_health(channel) == SERVING
        info = await stub.GetServerInfo(pb.GetServerInfoRequest())
        assert info.features.aligner_ready
        last_pid = supervisor.pid
    assert last_pid is not None
    await wait_until(lambda: not _alive(last_pid), 10, "the sidecar stops with the server")


async def test_sidecar_crash_mid_request_is_unavailable_for_that_request_only(
    tiny_checkpoints: TinyCheckpoints,
) -> None:
    config = spawn_config(tiny_checkpoints)
    # Every sidecar batch waits 1.5 s first, so a request is reliably in flight when the sidecar is killed.
    aligner = SidecarAligner(
        config.aligner, ready_wait_s=START_S, poll_interval_s=0.1, extra_sidecar_args=["--batch-delay-ms", "1500"]
    )
    assert aligner.supervisor is not None
    supervisor = aligner.supervisor
    samples = tone(2.0, seed=2)
    async with running_server(config, aligner=aligner) as (server, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        await wait_until(lambda: aligner.ready, START_S, "the sidecar reports SERVING")
        pid = supervisor.pid
        assert pid is not None

        in_flight = asyncio.ensure_future(stub.Transcribe(float32_request(samples, return_word_timestamps=True)))
        await wait_until(lambda: bool(aligner.client._in_flight), 10, "the request reaches the sidecar")
        await asyncio.sleep(0.3)
        # The metrics see the alignment waiting in the sidecar, and no restart yet.
        samples_before = scrape(server.metrics)
        assert value(samples_before, "asr_aligner_in_flight_requests") == 1
        assert value(samples_before, "asr_aligner_restarts_total") == 0
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        os.kill(pid, signal.SIGKILL)
        plain = await stub.Transcribe(float32_request(samples))  # no timestamps: unaffected
        assert plain.transcripts[0].text
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(in_flight, timeout=10)
        code, message = status_of(error.value)
        assert code == grpc.StatusCode.UNAVAILABLE and "retry" in message
        assert loop.time() - killed_at < 5.0

        await wait_until(lambda: aligner.ready and supervisor.pid not in (None, pid), START_S, "the sidecar is back")
        later = await stub.Transcribe(float32_request(samples, return_word_timestamps=True))
        assert later.transcripts[0].words
        samples_after = scrape(server.metrics)
        assert value(samples_after, "asr_aligner_restarts_total") == 1
        assert value(samples_after, "asr_aligner_in_flight_requests") == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie until reaped counts as gone.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().split()[2] != "Z"
    except OSError:
        return False
