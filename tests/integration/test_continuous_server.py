"""The continuous engine behind the real gRPC server (tiny checkpoint, CPU): parity with the reference path for
concurrent callers, two replicas (--devices cpu,cpu) sharing the load, and the benchmark forced-token mode."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np
import pytest

from asr_server.config import Config, ContinuousConfig, EngineConfig, ModelConfig
from asr_server.engine.replicas import ReplicatedRunner
from asr_server.models.loading import LoadedAsrModel, load_asr_model
from asr_server.models.tiny_checkpoint import TinyCheckpoints
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server

MAX_NEW_TOKENS = 16
FLOAT32_16K = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_FLOAT32, sample_rate_hz=16000, channel_count=1)


@pytest.fixture(scope="module")
def tiny_asr(tiny_checkpoints: TinyCheckpoints) -> LoadedAsrModel:
    return load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cpu")


def _config(model: str, **engine: Any) -> Config:
    base = fake_config()
    settings: dict[str, Any] = {
        "kind": "continuous",
        "max_batch_wait_ms": 0.0,
        "continuous": ContinuousConfig(max_running=4, kv_cache_tokens=8192),
        "warmup": True,
    }
    settings.update(engine)
    return dataclasses.replace(
        base, model=ModelConfig(model=model, device="cpu", dtype="float32"), engine=EngineConfig(**settings)
    )


def _audio(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    voiced = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) * (1 + np.sin(2 * np.pi * rng.uniform(2, 6) * t))
    return (voiced + 0.02 * rng.standard_normal(n)).astype(np.float32)


def _reference_text(loaded: LoadedAsrModel, audio: np.ndarray) -> str:
    import torch

    processor, model = loaded.processor, loaded.model
    inputs = processor.apply_transcription_request(audio=audio, language=None, prompt=None)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    parsed: dict[str, Any] = processor.decode(out[0, inputs["input_ids"].shape[1] :], return_format="parsed")
    return str(parsed.get("transcription") or "")


def _request(audio: np.ndarray) -> pb.TranscribeRequest:
    config = pb.RecognitionConfig(audio_format=FLOAT32_16K, max_new_tokens=MAX_NEW_TOKENS)
    return pb.TranscribeRequest(config=config, audio=audio.astype("<f4").tobytes())


@pytest.mark.parametrize(
    "continuous",
    [
        ContinuousConfig(max_running=4, kv_cache_tokens=8192),
        # Features computed by the engine (batched torch), prompts prefilled in chunks of a 32-token step budget.
        ContinuousConfig(max_running=4, kv_cache_tokens=8192, features="torch", max_step_tokens=32),
    ],
    ids=["defaults", "torch-features-chunked-prefill"],
)
async def test_concurrent_callers_on_two_replicas_get_the_reference_text(
    tiny_checkpoints: TinyCheckpoints, tiny_asr: LoadedAsrModel, continuous: ContinuousConfig
) -> None:
    clips = [_audio(0.6 + 0.4 * i, seed=i) for i in range(8)]
    expected = [_reference_text(tiny_asr, clip) for clip in clips]
    config = _config(str(tiny_checkpoints.asr_hf), devices=("cpu", "cpu"), continuous=continuous)
    async with running_server(config) as (server, channel):
        assert isinstance(server.engine, ReplicatedRunner)
        stub = pb_grpc.AsrServiceStub(channel)
        responses = await asyncio.gather(*(stub.Transcribe(_request(clip)) for clip in clips))
        steps = [runner.core.steps for runner in server.engine.runners]  # type: ignore[union-attr]
    got = [r.transcripts[0].text for r in responses]
    assert got == expected
    # The continuous engine reports its first token, before the response is complete.
    for r in responses:
        assert 1 <= r.timing.first_token_ms <= r.timing.total_ms
    # Both replicas decoded something beyond their warm-up.
    assert all(s > 5 for s in steps), steps


async def test_bench_mode_generates_four_tokens_per_second(tiny_checkpoints: TinyCheckpoints) -> None:
    config = _config(str(tiny_checkpoints.asr_hf), bench_forced_tokens_per_audio_s=4.0)
    async with running_server(config) as (server, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        response = await stub.Transcribe(_request(_audio(2.0, seed=3)))
    assert response.transcripts
