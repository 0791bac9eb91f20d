"""Trailing silence set per stream or server-wide, down to 200 ms (Silero VAD, espeak-ng speech, fake engine)."""

from __future__ import annotations

import dataclasses

import pytest

from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import Received, pcm16, run_stream, stream_config

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Six spoons of fresh snow peas.", "Hello there."]
FRAME_MS = 32  # the VAD's frame


def _speech_ended(received: Received) -> list[pb.StreamingRecognizeResponse]:
    return [
        r for _, r in received.responses
        if r.HasField("speech_event") and r.speech_event.type == pb.SPEECH_EVENT_TYPE_SPEECH_ENDED
    ]


@pytest.mark.parametrize("server_wide", [False, True])
async def test_200_ms_of_trailing_silence_ends_each_utterance_200_ms_after_its_speech(server_wide: bool) -> None:
    # Half a second between sentences: 200 ms of trailing silence ends each; the default 800 ms runs them together.
    audio, spans = synthesize_sentences(SENTENCES, silence_s=0.5)
    config = fake_config()
    endpointing = pb.EndpointingConfig(trailing_silence_ms=200)
    if server_wide:
        config = dataclasses.replace(config, streaming=dataclasses.replace(config.streaming, trailing_silence_ms=200))
        endpointing = pb.EndpointingConfig()  # 0: the server's default
    async with running_server(config) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        short = await run_stream(stub, stream_config(endpointing=endpointing), pcm16(audio))
        default = await run_stream(stub, stream_config(), pcm16(audio)) if not server_wide else None
    finals = short.finals
    assert [f.utterance_index for f in finals] == [0, 1, 2]
    for final, (start_s, end_s) in zip(finals, spans, strict=True):
        assert abs(final.start_ms - start_s * 1000) <= 100 and abs(final.end_ms - end_s * 1000) <= 100
    # SPEECH_ENDED comes once 200 ms (7 frames) of silence were seen after the speech's last frame, not later: the
    # final's decode starts that much sooner. (Except the last: the half-close flushes it.)
    for event in _speech_ended(short)[:-1]:
        waited_ms = event.processed_audio_ms - event.speech_event.offset_ms
        assert 200 <= waited_ms <= 200 + 3 * FRAME_MS, waited_ms
    if default is not None:
        assert len(default.finals) < len(SENTENCES)  # 800 ms: the 0.5 s pauses do not end an utterance
