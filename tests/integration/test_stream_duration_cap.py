"""--max-stream-duration-s: a live stream is cut for load balancing, losing no speech and telling the caller how to
resume (StreamingRecognize over real gRPC, fake engine, real Silero VAD)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator

import grpc
import pytest

from asr_server.config import StreamingConfig
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import Received, ServerStatus, pcm16, stream_config

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")


async def _stream_until_cut(
    stub: pb_grpc.AsrServiceStub, data: bytes, stop: asyncio.Event
) -> tuple[ServerStatus, Received, float]:
    """Sends `data` in 100 ms pieces, then nothing (inside the idle timeout) until the server ends the call."""

    async def requests() -> AsyncIterator[pb.StreamingRecognizeRequest]:
        yield stream_config()
        for offset in range(0, len(data), 3200):
            yield pb.StreamingRecognizeRequest(audio=data[offset : offset + 3200])
        await stop.wait()

    received = Received()
    loop = asyncio.get_running_loop()
    started = loop.time()
    call = stub.StreamingRecognize(requests())
    status = ServerStatus(call)
    try:
        async for response in call:
            received.responses.append((loop.time() - started, response))
    except grpc.aio.AioRpcError:
        pass
    finally:
        stop.set()
    return status, received, loop.time() - started


async def test_a_stream_at_the_cap_flushes_its_utterance_and_ends_unavailable_with_a_resume_hint() -> None:
    audio, spans = synthesize_sentences(["Hello there, how are you today?", "The quick brown fox."], silence_s=0.8)
    # The audio stops inside the second sentence, faster than real time; the cap comes after all of it was
    # processed, with the second utterance open.
    cut_s = spans[1][0] + 0.5
    cap_s = 3.0
    data = pcm16(audio[: int(cut_s * 16000)])
    config = dataclasses.replace(fake_config(), streaming=StreamingConfig(max_duration_s=cap_s))
    async with running_server(config) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        # A first stream loads the VAD (seconds on a busy CI core), which would otherwise eat into the cap.
        warm = stub.StreamingRecognize(iter([stream_config(), pb.StreamingRecognizeRequest(audio=data[:32000])]))
        async for _ in warm:
            pass
        status, received, elapsed = await _stream_until_cut(stub, data, asyncio.Event())
    assert status.code == grpc.StatusCode.UNAVAILABLE, status.details
    assert f"--max-stream-duration-s={cap_s:g}" in status.details
    assert status.retry_info  # a client's retry policy may resume at once
    hint = re.search(r"processed_audio_ms=(\d+)", status.details)
    assert hint is not None, status.details
    finals = received.finals
    # The first sentence's own final, then the open second one flushed: no speech lost.
    assert len(finals) == 2, ([f.text for f in finals], status.details)
    processed_ms = int(hint.group(1))
    assert abs(processed_ms - cut_s * 1000) <= 64  # all audio sent went through VAD (32 ms frames)
    assert abs(finals[1].start_ms - spans[1][0] * 1000) < 200
    assert finals[1].end_ms == int(cut_s * 16000) // 16  # up to the last sample sent
    assert cap_s <= elapsed < cap_s + 5


async def test_streams_under_the_cap_or_with_no_cap_run_to_their_end() -> None:
    audio, _ = synthesize_sentences(["Hello there, how are you today?"], silence_s=0.5)
    data = pcm16(audio)
    for cap_s in (0.0, 60.0):
        config = dataclasses.replace(fake_config(), streaming=StreamingConfig(max_duration_s=cap_s))

        async def requests() -> AsyncIterator[pb.StreamingRecognizeRequest]:
            yield stream_config()
            for offset in range(0, len(data), 3200):
                yield pb.StreamingRecognizeRequest(audio=data[offset : offset + 3200])

        async with running_server(config) as (_, channel):
            responses = [r async for r in pb_grpc.AsrServiceStub(channel).StreamingRecognize(requests())]
        assert sum(r.result.is_final for r in responses if r.HasField("result")) == 1, cap_s
