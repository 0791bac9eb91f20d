"""The decoded-audio budget (--max-decoded-audio-mb): a tiny FLAC of hours of silence is refused before it is
decoded when it does not fit, and decoding one that fits holds the 16 kHz result once, not twice."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import tracemalloc

import grpc
import numpy as np
import pytest
import soundfile
from grpc_status import rpc_status

from asr_server.audio.budget import BYTES_PER_MIB, DecodedAudioBudget, decoded_bytes
from asr_server.audio.files import decode_file
from asr_server.audio.formats import AudioFormat, Encoding
from asr_server.errors import LimitExceeded, Unavailable
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, with_limits

FILE = AudioFormat(Encoding.FILE, 0, 0)
RATE_HZ = 16_000


def silent_flac(seconds: int, rate_hz: int = RATE_HZ) -> bytes:
    """`seconds` of digital silence as FLAC, written a minute at a time (a few KB per hour on disk)."""
    out = io.BytesIO()
    with soundfile.SoundFile(out, "w", samplerate=rate_hz, channels=1, format="FLAC", subtype="PCM_16") as flac:
        minute = np.zeros(rate_hz * 60, dtype=np.int16)
        for _ in range(seconds // 60):
            flac.write(minute)
    return out.getvalue()


@pytest.fixture(scope="module")
def one_hour_flac() -> bytes:
    return silent_flac(3600)


def test_an_hour_of_silence_decodes_holding_its_result_once(one_hour_flac: bytes) -> None:
    assert len(one_hour_flac) < 400_000  # small on the wire ...
    result_bytes = 3600 * RATE_HZ * 4  # ... 230 MB decoded
    tracemalloc.start()
    try:
        audio = decode_file(one_hour_flac, FILE, max_audio_duration_s=4 * 3600, downmix=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert audio.channels[0].shape[0] == 3600 * RATE_HZ
    assert not audio.channels[0].any()
    # Block-wise pieces joined at the end held it twice (2.0x); one buffer sized from the header holds it once.
    assert peak < 1.15 * result_bytes, peak / result_bytes


def test_a_file_larger_than_the_whole_budget_is_refused_before_decoding(one_hour_flac: bytes) -> None:
    budget = DecodedAudioBudget(100 * BYTES_PER_MIB)
    hold = budget.hold()
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceeded) as refused:
            decode_file(one_hour_flac, FILE, max_audio_duration_s=4 * 3600, downmix=False, reserve=hold.reserve)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 1024 * 1024, peak  # nothing of the 230 MB was allocated
    assert "--max-decoded-audio-mb=100" in str(refused.value) and "220 MiB" in str(refused.value)
    assert refused.value.retry_after_s is None  # retrying cannot help
    assert budget.held_bytes == 0


def test_the_budget_is_shared_released_and_closed_with_its_call() -> None:
    budget = DecodedAudioBudget(10 * BYTES_PER_MIB)
    first, second = budget.hold(), budget.hold()
    first.reserve(8 * BYTES_PER_MIB)
    with pytest.raises(LimitExceeded) as busy:
        second.reserve(4 * BYTES_PER_MIB)
    assert busy.value.retry_after_s is not None  # others hold it: retrying can succeed
    assert "8 MiB held" in str(busy.value)
    first.release()
    second.reserve(4 * BYTES_PER_MIB)
    assert budget.held_bytes == 4 * BYTES_PER_MIB
    second.release()
    assert budget.held_bytes == 0
    # A decode thread outliving its cancelled call takes nothing more.
    with pytest.raises(Unavailable):
        second.reserve(1)
    assert budget.held_bytes == 0
    assert decoded_bytes(8000, 8000, 2) == 16000 * 2 * 4


async def test_over_budget_calls_get_resource_exhausted_and_others_still_succeed(one_hour_flac: bytes) -> None:
    # 300 MiB: one decoded hour (220 MiB) fits, a second at the same time does not.
    config = with_limits(fake_config(fake_batch_delay_ms=1500), max_decoded_audio_mb=300)
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, max_queued_requests=4096))
    async with running_server(config) as (server, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        calls = [asyncio.ensure_future(stub.Transcribe(pb.TranscribeRequest(audio=one_hour_flac))) for _ in range(3)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert server._servicer._decoded_budget.held_bytes == 0  # type: ignore[union-attr]
    served = [o for o in outcomes if isinstance(o, pb.TranscribeResponse)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(served) >= 1 and len(served) + len(refused) == 3, outcomes
    assert refused, outcomes
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-decoded-audio-mb=300" in (error.details() or "")
        assert rpc_status.from_call(error) is not None  # RetryInfo: the budget frees as calls finish
