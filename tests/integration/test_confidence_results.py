"""Result confidence over real gRPC: the fake engine's made-up token probabilities reach every result exactly, and
the two model engines give the same confidence for the same audio on the tiny checkpoint."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

from asr_server.config import Config, ContinuousConfig, EngineConfig, ModelConfig
from asr_server.engine.fake import fake_transcript
from asr_server.engine.types import DecodeOptions, DecodeRequest
from asr_server.models.tiny_checkpoint import TinyCheckpoints
from asr_server.results import Word
from asr_server.transcription import AlignmentResult
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, with_limits
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import pcm16, pcm16_roundtrip, run_stream, stream_config

FLOAT32_16K = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_FLOAT32, sample_rate_hz=16000, channel_count=1)


def fake_probs(samples_16k: np.ndarray) -> list[float]:
    """The fake engine's token probabilities for one decoded piece (0.5 + level / 2000 per word)."""
    _, ids = fake_transcript(DecodeRequest("x", samples_16k, DecodeOptions(None, "", 4096)))
    return [math.exp(math.log(0.5 + min(level, 999) / 2000)) for level in ids]


def float32_request(samples: np.ndarray, **config: Any) -> pb.TranscribeRequest:
    return pb.TranscribeRequest(
        config=pb.RecognitionConfig(audio_format=FLOAT32_16K, **config), audio=samples.astype("<f4").tobytes()
    )


async def test_transcript_and_segment_confidence_are_the_mean_token_probability() -> None:
    # Two chunks of different loudness: the transcript's mean is over all their tokens, not of the two means.
    loud = tone(2.0, amplitude=0.6, seed=1)
    quiet = tone(6.0, amplitude=0.05, seed=2)
    samples = np.concatenate([loud, np.zeros(8000, np.float32), quiet])
    async with running_server(with_limits(fake_config(), max_chunk_s=3)) as (_, channel):
        response = await pb_grpc.AsrServiceStub(channel).Transcribe(float32_request(samples))
    (transcript,) = response.transcripts
    assert len(transcript.segments) >= 2
    per_segment = [fake_probs(samples[s.start_ms * 16 : s.end_ms * 16]) for s in transcript.segments]
    for segment, probs in zip(transcript.segments, per_segment, strict=True):
        assert segment.confidence == pytest.approx(sum(probs) / len(probs), rel=1e-6)
    everything = [p for probs in per_segment for p in probs]
    assert transcript.confidence == pytest.approx(sum(everything) / len(everything), rel=1e-6)
    assert 0.5 < transcript.confidence < 1.0
    assert len({round(s.confidence, 4) for s in transcript.segments}) > 1  # loud and quiet chunks differ


async def test_no_text_has_confidence_zero() -> None:
    async with running_server(fake_config()) as (_, channel):
        response = await pb_grpc.AsrServiceStub(channel).Transcribe(float32_request(np.zeros(16000, np.float32)))
    (transcript,) = response.transcripts
    assert (transcript.text, transcript.confidence) == ("", 0.0)


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
async def test_streaming_results_carry_the_confidence_of_their_tokens() -> None:
    samples, _ = synthesize_sentences(["Hello there, how are you today?"], silence_s=0.5)
    async with running_server(fake_config()) as (_, channel):
        received = await run_stream(
            pb_grpc.AsrServiceStub(channel), stream_config(interim=True, interval_ms=300), pcm16(samples)
        )
    (final,) = received.finals
    audio = pcm16_roundtrip(samples)[final.start_ms * 16 : final.end_ms * 16]
    probs = fake_probs(np.pad(audio, (0, max(0, 8000 - audio.shape[0]))))
    assert final.confidence == pytest.approx(sum(probs) / len(probs), rel=1e-6)
    interims = [r for _, r in received.interims if r.text]
    assert interims and all(0.5 < r.confidence < 1.0 for r in interims)


def _model_config(model: str, kind: str) -> Config:
    engine: dict[str, Any] = {"kind": kind, "max_batch_wait_ms": 0.0, "warmup": False}
    if kind == "continuous":
        engine["continuous"] = ContinuousConfig(max_running=4, kv_cache_tokens=8192)
    return dataclasses.replace(
        fake_config(), model=ModelConfig(model=model, device="cpu", dtype="float32"), engine=EngineConfig(**engine)
    )


async def test_both_model_engines_give_the_same_confidence_for_the_same_tokens(
    tiny_checkpoints: TinyCheckpoints,
) -> None:
    rng = np.random.default_rng(7)
    clips = [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in (1.3, 2.6)]
    got: dict[str, list[tuple[str, float]]] = {}
    for kind in ("continuous", "transformers"):
        async with running_server(_model_config(str(tiny_checkpoints.asr_hf), kind)) as (_, channel):
            stub = pb_grpc.AsrServiceStub(channel)
            got[kind] = []
            for clip in clips:
                for language in ("", "English"):
                    response = await stub.Transcribe(float32_request(clip, language=language, max_new_tokens=12))
                    transcript = response.transcripts[0]
                    got[kind].append((transcript.text, transcript.confidence))
    assert [t for t, _ in got["continuous"]] == [t for t, _ in got["transformers"]]
    for (_, a), (_, b) in zip(got["continuous"], got["transformers"], strict=True):
        assert 0.0 < a <= 1.0
        assert a == pytest.approx(b, abs=1e-5)


class SpaceAligner:
    """Times each space-separated word at 100 ms steps, as an aligner would split the fake engine's text."""

    async def align(self, audio_16k: np.ndarray, text: str, language: str) -> AlignmentResult:
        return AlignmentResult(
            tuple(Word(w, 100 * i, 100 * i + 80) for i, w in enumerate(text.split())), alignment_ms=1.0
        )


async def test_each_word_gets_the_probability_of_its_tokens() -> None:
    samples = np.concatenate([tone(1.0, amplitude=a, seed=i) for i, a in enumerate((0.6, 0.05, 0.3))])
    async with running_server(fake_config(), aligner=SpaceAligner()) as (_, channel):
        response = await pb_grpc.AsrServiceStub(channel).Transcribe(
            float32_request(samples, return_word_timestamps=True)
        )
    (transcript,) = response.transcripts
    probs = fake_probs(samples)  # one token per word
    assert [w.text for w in transcript.words] == transcript.text.split()
    assert [w.confidence for w in transcript.words] == pytest.approx(probs, rel=1e-6)
    assert len({round(w.confidence, 4) for w in transcript.words}) > 1


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
async def test_streaming_final_words_get_the_probability_of_their_tokens() -> None:
    samples, _ = synthesize_sentences(["Hello there, how are you today?"], silence_s=0.5)
    async with running_server(fake_config(), aligner=SpaceAligner()) as (_, channel):
        received = await run_stream(
            pb_grpc.AsrServiceStub(channel), stream_config(return_word_timestamps=True), pcm16(samples)
        )
    (final,) = received.finals
    audio = pcm16_roundtrip(samples)[final.start_ms * 16 : final.end_ms * 16]
    probs = fake_probs(np.pad(audio, (0, max(0, 8000 - audio.shape[0]))))
    assert [w.text for w in final.words] == final.text.split()
    assert [w.confidence for w in final.words] == pytest.approx(probs, rel=1e-6)
