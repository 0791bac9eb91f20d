"""Parity with transformers' reference path on the tiny checkpoint, through the real gRPC server.

Reference: processor.apply_transcription_request -> model.generate -> processor.decode(parsed), one clip at a
time. The server batches, pads and fans out; none of that may change a single token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from asr_server.engine.generate_core import GenerateEngine
from asr_server.models.loading import LoadedAsrModel, load_asr_model
from asr_server.models.tiny_checkpoint import TinyCheckpoints
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server

MAX_NEW_TOKENS = 24
FLOAT32_16K = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_FLOAT32, sample_rate_hz=16000, channel_count=1)


@pytest.fixture(scope="module")
def tiny_asr(tiny_checkpoints: TinyCheckpoints) -> LoadedAsrModel:
    return load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cpu")


def speechlike(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    voiced = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) * (1 + np.sin(2 * np.pi * rng.uniform(2, 6) * t))
    return (voiced + 0.02 * rng.standard_normal(n)).astype(np.float32)


def reference(loaded: LoadedAsrModel, audio: np.ndarray, language: str | None, context: str) -> dict[str, Any]:
    import torch

    processor, model = loaded.processor, loaded.model
    inputs = processor.apply_transcription_request(audio=audio, language=language, prompt=context or None)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    parsed: dict[str, Any] = processor.decode(out[0, inputs["input_ids"].shape[1] :], return_format="parsed")
    return parsed


def request(audio: np.ndarray, language: str | None, context: str) -> pb.TranscribeRequest:
    config = pb.RecognitionConfig(
        audio_format=FLOAT32_16K, language=language or "", context=context, max_new_tokens=MAX_NEW_TOKENS
    )
    return pb.TranscribeRequest(config=config, audio=audio.astype("<f4").tobytes())


class RecordingEngine(GenerateEngine):
    """The real core, remembering each batch's size."""

    def __init__(self, loaded: LoadedAsrModel, max_batch_size: int) -> None:
        super().__init__(loaded, max_batch_size=max_batch_size)
        self.batch_sizes: list[int] = []

    def step(self):  # type: ignore[no-untyped-def]
        self.batch_sizes.append(min(self.num_waiting(), self._max_batch_size))
        return super().step()


def cases() -> Iterator[tuple[str | None, str]]:
    yield None, ""
    yield "English", ""
    yield None, "Qwen, Alibaba, gRPC"
    yield "zh", "会议记录"


@pytest.mark.parametrize(("language", "context"), list(cases()))
async def test_a_lone_request_equals_the_reference(tiny_asr: LoadedAsrModel, language: str | None, context: str) -> None:
    audio = speechlike(2.3, seed=11)
    expected = reference(tiny_asr, audio, {"zh": "Chinese"}.get(language or "", language), context)
    async with running_server(fake_config(kind="transformers"), core_factory=lambda: GenerateEngine(tiny_asr, max_batch_size=4)) as (_, channel):
        response = await pb_grpc.AsrServiceStub(channel).Transcribe(request(audio, language, context))
    (transcript,) = response.transcripts
    assert transcript.text == expected["transcription"]
    assert response.timing.first_token_ms == 0  # padded generate cannot tell when its first token came
    if language is None:
        assert transcript.language == (expected["language"] or "")
    else:
        assert transcript.language == {"zh": "Chinese"}.get(language, language)


async def test_sixteen_concurrent_requests_of_different_lengths_batch_and_match_alone(tiny_asr: LoadedAsrModel) -> None:
    # Lengths from 0.3 s (padded to 0.5 s by the model) to 9 s, options mixed, so batches hold
    # short and long clips, forced and detected languages, with and without context.
    lengths_s = [0.3, 9.0, 1.1, 4.2, 0.7, 2.5, 6.1, 0.45, 3.3, 1.9, 8.2, 0.9, 5.0, 2.0, 7.4, 1.4]
    clips = [speechlike(s, seed=100 + i) for i, s in enumerate(lengths_s)]
    options = [(["English", None][i % 2], ["", "hotwords: Qwen"][(i // 2) % 2]) for i in range(16)]
    expected = [reference(tiny_asr, clip, lang, ctx) for clip, (lang, ctx) in zip(clips, options, strict=True)]
    engines: list[RecordingEngine] = []

    def factory() -> RecordingEngine:
        engines.append(RecordingEngine(tiny_asr, max_batch_size=16))
        return engines[-1]

    config = fake_config(kind="transformers", max_inference_batch_size=16, max_batch_wait_ms=300)
    async with running_server(config, core_factory=factory) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        responses = await asyncio.gather(
            *(stub.Transcribe(request(clip, lang, ctx)) for clip, (lang, ctx) in zip(clips, options, strict=True))
        )
    assert max(engines[0].batch_sizes) >= 8, engines[0].batch_sizes
    for i, (response, want) in enumerate(zip(responses, expected, strict=True)):
        assert response.transcripts[0].text == want["transcription"], f"clip {i} ({lengths_s[i]} s)"
        # A forced language is echoed; a detected one is what the reference parsed from the same tokens.
        assert response.transcripts[0].language == (options[i][0] or want["language"] or ""), f"clip {i}"


async def test_the_original_layout_serves_the_same_transcripts_as_hf(
    tiny_checkpoints: TinyCheckpoints, tiny_asr: LoadedAsrModel
) -> None:
    original = load_asr_model(str(tiny_checkpoints.asr_original), dtype="float32", device="cpu")
    assert original.layout == "original" and tiny_asr.layout == "hf"
    clips = [speechlike(s, seed=7 + i) for i, s in enumerate([0.4, 1.5, 3.0])]
    texts = {}
    for name, loaded in (("hf", tiny_asr), ("original", original)):
        async with running_server(fake_config(kind="transformers"), core_factory=lambda loaded=loaded: GenerateEngine(loaded, max_batch_size=4)) as (_, channel):
            stub = pb_grpc.AsrServiceStub(channel)
            responses = await asyncio.gather(*(stub.Transcribe(request(c, None, "ctx")) for c in clips))
        texts[name] = [(r.transcripts[0].text, r.transcripts[0].language) for r in responses]
    assert texts["hf"] == texts["original"]
    assert texts["hf"] == [
        (reference(tiny_asr, c, None, "ctx")["transcription"], reference(tiny_asr, c, None, "ctx")["language"] or "")
        for c in clips
    ]
