"""Language names and BCP-47 codes in results over real gRPC (fake engine): forced, detected, streamed."""

from __future__ import annotations

import pytest

from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, wav_bytes
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import pcm16, run_stream, stream_config


@pytest.mark.parametrize(
    ("sent", "name", "code"),
    [("zh-CN", "Chinese", "zh"), ("Cantonese", "Cantonese", "yue"), ("", "English", "en")],
    ids=["forced-by-tag", "forced-by-name", "detected"],
)
async def test_transcripts_carry_the_code_beside_the_name(sent: str, name: str, code: str) -> None:
    async with running_server(fake_config()) as (_, channel):
        response = await pb_grpc.AsrServiceStub(channel).Transcribe(
            pb.TranscribeRequest(config=pb.RecognitionConfig(language=sent), audio=wav_bytes(tone(2.0, seed=3)))
        )
    (transcript,) = response.transcripts
    assert (transcript.language, transcript.language_code) == (name, code)
    assert (list(transcript.languages), list(transcript.language_codes)) == ([name], [code])
    assert [(s.language, s.language_code) for s in transcript.segments] == [(name, code)]


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
async def test_streaming_finals_carry_the_code() -> None:
    samples, _ = synthesize_sentences(["Hello there, how are you today?"], silence_s=1.0)
    async with running_server(fake_config()) as (_, channel):
        received = await run_stream(pb_grpc.AsrServiceStub(channel), stream_config(language="fr"), pcm16(samples))
    assert received.finals
    assert {(f.language, f.language_code) for f in received.finals} == {("French", "fr")}
