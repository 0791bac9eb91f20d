"""StreamingRecognitionConfig.speech_start_timeout_ms over real gRPC (fake engine, the real Silero VAD): a stream
with no speech in its first N ms of audio gets SPEECH_START_TIMEOUT at N and ends OK; one that speaks in time runs
on as usual."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server
from tests.integration.test_streaming_fake import call_status
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import Received, pcm16, run_stream, stream_config

TIMEOUT = pb.SPEECH_EVENT_TYPE_SPEECH_START_TIMEOUT
STARTED = pb.SPEECH_EVENT_TYPE_SPEECH_STARTED
SPEECH = ["Hello there, how are you today?"]


def with_timeout(timeout_ms: int) -> pb.StreamingRecognizeRequest:
    config = stream_config()
    config.config.speech_start_timeout_ms = timeout_ms
    return config


async def stream(samples: np.ndarray, timeout_ms: int) -> Received:
    async with running_server(fake_config()) as (_, channel):
        return await run_stream(pb_grpc.AsrServiceStub(channel), with_timeout(timeout_ms), pcm16(samples))


async def test_a_silent_stream_ends_ok_at_the_timeout_with_the_event_and_nothing_else() -> None:
    received = await stream(np.zeros(16000 * 6, dtype=np.float32), 1500)
    (only,) = [r for _, r in received.responses]
    assert only.speech_event.type == TIMEOUT
    assert only.speech_event.offset_ms == 1500
    # Raised as soon as the audio processed reached the timeout (one 20 ms piece, one 32 ms VAD frame late at most).
    assert 1500 <= only.processed_audio_ms <= 1500 + 20 + 32
    assert only.request_id


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
async def test_a_stream_that_speaks_before_the_timeout_runs_on_and_gets_its_final() -> None:
    samples, spans = synthesize_sentences(SPEECH, silence_s=0.5)
    received = await stream(samples, 1500)
    assert not received.events(TIMEOUT)
    assert len(received.events(STARTED)) == 1 and len(received.finals) == 1
    assert received.finals[0].end_ms >= spans[0][1] * 1000 - 100


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
async def test_speech_after_the_timeout_comes_too_late() -> None:
    samples, _ = synthesize_sentences(SPEECH, silence_s=2.0)
    received = await stream(samples, 1500)
    assert [r.speech_event.type for _, r in received.responses] == [TIMEOUT]
    assert received.responses[0][1].speech_event.offset_ms == 1500


@pytest.mark.parametrize("timeout_ms", [99, 3_600_001])
async def test_a_timeout_out_of_range_is_invalid_argument(timeout_ms: int) -> None:
    async with running_server(fake_config()) as (_, channel):
        code, details, _ = await call_status(pb_grpc.AsrServiceStub(channel), [with_timeout(timeout_ms)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "speech_start_timeout_ms" in details and "100 to 3600000" in details
