"""The issue's memory proof against a real `asr-server serve` process: ten concurrent 4-hour silent FLACs (730 KB
each on the wire, 879 MiB each decoded) with --max-decoded-audio-mb 2000 keep the server's peak RSS under its
idle RSS + the budget + a stated margin; the ones that do not fit get RESOURCE_EXHAUSTED at once (with RetryInfo:
others hold the budget), and the others still succeed."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.clients.servers import running_server_process
from tests.integration.test_decoded_audio_budget import silent_flac
from tests.streaming_helpers import ServerStatus

BUDGET_MIB = 2000
# What the server may hold beyond the budget and its idle RSS while decoding and transcribing: the ten requests'
# bytes (7 MB), gRPC and allocator slack, the transcriber's chunk copies and VAD state. Without the budget the same
# ten files take 10 x 879 MiB.
MARGIN_MIB = 400
FILES = 10
HOURS = 4


def _kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise AssertionError(f"no {field} in /proc/{pid}/status")
    return int(match.group(1))


async def _serving(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    async with asyncio.timeout(60):
        while True:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_ten_concurrent_four_hour_flacs_stay_within_the_decoded_audio_budget() -> None:
    flac = silent_flac(HOURS * 3600)
    assert len(flac) < 1_000_000
    args = ("--engine", "fake", "--no-warmup", "--max-decoded-audio-mb", str(BUDGET_MIB),
            "--max-audio-duration-s", str(HOURS * 3600), "--max-message-bytes", str(4 << 20))
    with running_server_process(*args) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await _serving(channel)
            idle_kib = _kib(server.pid, "VmRSS")
            stub = pb_grpc.AsrServiceStub(channel)
            calls = [stub.Transcribe(pb.TranscribeRequest(audio=flac), timeout=120) for _ in range(FILES)]
            statuses = [ServerStatus(call) for call in calls]
            results = await asyncio.gather(*calls, return_exceptions=True)
            peak_kib = _kib(server.pid, "VmHWM")
    codes = [s.code for s in statuses]
    ok = [r for r in results if isinstance(r, pb.TranscribeResponse)]
    refused = [s for s in statuses if s.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(ok) + len(refused) == FILES, codes
    # 879 MiB each: two fit in 2000 MiB at once (a third may fit once one is done, if it arrives that late).
    assert len(ok) >= 2, codes
    assert len(refused) >= 1, codes
    assert all(r.audio_duration_ms == HOURS * 3600 * 1000 for r in ok)
    assert all(s.retry_info and "--max-decoded-audio-mb" in s.details for s in refused), refused[0].details
    grown_mib = (peak_kib - idle_kib) / 1024
    assert grown_mib < BUDGET_MIB + MARGIN_MIB, (grown_mib, idle_kib / 1024, peak_kib / 1024)
