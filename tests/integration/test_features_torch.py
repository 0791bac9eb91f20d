"""Log-mel features in torch (engine/continuous/features.py) against transformers' Qwen3ASRFeatureExtractor, and the
continuous engine with features="torch" against `model.generate` on the reference path (tiny checkpoint, fp32, CPU).

Measured on this CPU: 0.0 max abs deviation from the extractor (bit-for-bit) over 0.01-30 s of noise, tones, silence,
quiet noise and hot audio near +-1000, alone and batched. On an H200 (cuFFT, same math) the deviation from the CPU
extractor was at most 2.6e-5; REFERENCE_TOLERANCE (1e-4) is the bound both are held to.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from asr_server.engine.continuous import features as features_module
from asr_server.engine.continuous.core import ContinuousConfig, ContinuousEngine
from asr_server.engine.continuous.features import REFERENCE_TOLERANCE, TorchFeatureExtractor
from asr_server.engine.continuous.prepare import FastPreparer
from asr_server.engine.core import EngineOutput
from asr_server.engine.generate_core import GenerateEngine, prepare_single
from asr_server.engine.types import DecodeOptions, DecodeRequest, WorkItem
from asr_server.errors import InvalidInput
from asr_server.models.loading import LoadedAsrModel, load_asr_model

SECONDS = [0.01, 0.1, 0.3, 0.4999, 0.5, 0.50001, 0.77, 1.0, 1.00625, 2.3, 7.99, 8.0, 13.37, 29.95, 30.0]
N_WINDOW = 50


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints: Any) -> LoadedAsrModel:
    return load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cpu")


def _clips(seconds: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    samples = int(round(seconds * 16000))
    t = np.arange(samples) / 16000
    clips = [
        0.1 * rng.standard_normal(samples),
        0.5 * np.sin(2 * np.pi * 440 * t),
        np.zeros(samples),
        1e-4 * rng.standard_normal(samples),
        1000 * np.clip(rng.standard_normal(samples), -1, 1),
        np.where(t > seconds / 2, 0.5 * np.sin(2 * np.pi * 1000 * t), 0.0),
    ]
    return [c.astype(np.float32) for c in clips]


def _extractor(loaded: LoadedAsrModel, clip: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
    processor: Any = loaded.processor
    out = processor.feature_extractor(
        [clip],
        sampling_rate=16000,
        padding=True,
        truncation=False,
        return_attention_mask=True,
        n_window=N_WINDOW,
        return_tensors="pt",
    )
    mask = out["attention_mask"]
    count = int(processor._get_audio_token_length(mask.sum(-1), N_WINDOW)[0])
    return out["input_features"], mask, count


def test_features_equal_the_extractor_alone_and_batched(loaded: LoadedAsrModel) -> None:
    extractor = TorchFeatureExtractor(loaded.processor, n_window=N_WINDOW)
    clips = [c for i, s in enumerate(SECONDS) for c in _clips(s, seed=i)]
    # One batch of every clip, shortest beside longest: each row must be the clip alone.
    batch = extractor(clips)
    worst_alone = worst_batched = 0.0
    for row, clip in enumerate(clips):
        features, mask, count = _extractor(loaded, clip)
        alone = extractor([clip]).clip(0)
        batched = batch.clip(row)
        for mine in (alone, batched):
            assert mine.input_features.shape == features.shape and mine.input_features.dtype == torch.float32
            assert torch.equal(mine.input_features_mask, mask)
            assert mine.num_audio_tokens == count
        worst_alone = max(worst_alone, float((alone.input_features - features).abs().max()))
        worst_batched = max(worst_batched, float((batched.input_features - features).abs().max()))
        # Past a row's own frames the batch holds zeros, as collate's per-clip zero padding does.
        assert not batch.input_features[row, :, batch.frames[row] :].any()
        assert not batch.input_features_mask[row, batch.frames[row] :].any()
    print(f"max abs deviation from the extractor: alone {worst_alone:.3g}, batched {worst_batched:.3g}")
    assert worst_alone <= REFERENCE_TOLERANCE and worst_batched <= REFERENCE_TOLERANCE
    # The figure docs/benchmarks.md states for the CPU: the same torch ops as the extractor's, bit for bit.
    assert worst_alone == 0.0 and worst_batched == 0.0


def test_a_short_clip_batched_with_long_ones_equals_itself_alone(loaded: LoadedAsrModel) -> None:
    extractor = TorchFeatureExtractor(loaded.processor, n_window=N_WINDOW)
    rng = np.random.default_rng(5)
    short = (0.05 * rng.standard_normal(4000)).astype(np.float32)
    loud_long = (0.9 * rng.standard_normal(16000 * 12)).astype(np.float32)
    silent_long = np.zeros(16000 * 20, dtype=np.float32)
    batch = extractor([loud_long, short, silent_long])
    alone = extractor([short]).clip(0)
    reference, _, _ = _extractor(loaded, short)
    got = batch.clip(1).input_features
    assert got.shape == alone.input_features.shape == reference.shape
    assert float((got - alone.input_features).abs().max()) <= REFERENCE_TOLERANCE
    assert float((got - reference).abs().max()) <= REFERENCE_TOLERANCE


def test_torch_preparer_equals_the_reference_preprocessing(loaded: LoadedAsrModel) -> None:
    preparer = FastPreparer(loaded, features="torch")
    for seconds, language, prefix in [
        (0.2, None, ""),
        (5.0, "English", ""),
        (31.0, None, "language English<asr_text>he"),
    ]:
        audio = (0.1 * np.random.default_rng(3).standard_normal(int(seconds * 16000))).astype(np.float32)
        request = DecodeRequest("p", audio, DecodeOptions(language, "", 10), prefix_text=prefix)
        reference = prepare_single(loaded, request)
        mine = preparer(request)
        assert torch.equal(mine.input_ids, reference.input_ids)
        assert torch.equal(mine.input_features_mask, reference.input_features_mask)
        assert float((mine.input_features - reference.input_features).abs().max()) <= REFERENCE_TOLERANCE
    # The probe's self-check passed: the torch path was used, not the reference fallback.
    assert preparer.cached_templates == 2 and all(t is not None for t in preparer._templates.values())
    with pytest.raises(ValueError, match="features must be"):
        FastPreparer(loaded, features="cuda")


def _request(rid: str, seconds: float, max_new: int, seed: int, prefix: str = "") -> DecodeRequest:
    audio = (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)
    return DecodeRequest(rid, audio, DecodeOptions(None, "", max_new), prefix_text=prefix)


def _item(request: DecodeRequest) -> WorkItem:
    return WorkItem(request, time.time_ns(), time.monotonic())


def _reference(loaded: LoadedAsrModel, requests: list[DecodeRequest]) -> dict[str, tuple[int, ...]]:
    engine = GenerateEngine(loaded, max_batch_size=1)
    out: dict[str, tuple[int, ...]] = {}
    for request in requests:
        (result,) = engine._run_batch([_item(request)])
        assert result.result is not None
        out[request.request_id] = result.result.token_ids
    return out


def _drain(engine: ContinuousEngine) -> Iterator[EngineOutput]:
    while engine.num_waiting() or engine.num_running():
        yield from engine.step()


def _torch_engine(loaded: LoadedAsrModel) -> ContinuousEngine:
    engine = ContinuousEngine(
        loaded, ContinuousConfig(max_running=8, page_size=16, kv_cache_tokens=8192, features="torch")
    )
    assert engine._preparer._torch is not None
    return engine


def test_continuous_engine_with_torch_features_gives_the_reference_tokens(loaded: LoadedAsrModel) -> None:
    requests = [
        _request(f"r{i}", seconds, max_new, seed=i)
        for i, (seconds, max_new) in enumerate([(0.2, 12), (0.3, 20), (0.8, 5), (2.5, 30), (4.0, 24), (9.3, 16)])
    ]
    requests.append(_request("s0", 2.0, 15, seed=40, prefix="language English<asr_text>he"))
    requests.append(_request("s1", 6.5, 15, seed=41, prefix="language English<asr_text>hello wor"))
    expected = _reference(loaded, requests)
    engine = _torch_engine(loaded)
    extractor = engine._runner._features
    assert extractor is not None
    calls: list[int] = []

    def counting(clips: Any) -> Any:
        calls.append(len(clips))
        return extractor(clips)

    engine._runner._features = counting  # type: ignore[assignment]
    for request in requests:
        engine.add(_item(request))
    for pending in engine._requests.values():
        pending.prepared.future.result()  # every prompt's ids ready: all 8 are admitted in the first step
    outputs = list(_drain(engine))
    # The preprocess threads made only the ids; the engine computed the features of all 8 clips in one call.
    assert calls == [8]
    got = {}
    for o in outputs:
        assert o.error is None, o.error
        assert o.result is not None
        got[o.request_id] = o.result.token_ids
    assert got == expected
    assert all(t is not None for t in engine._preparer._templates.values())


def test_non_finite_audio_through_torch_features_fails_that_request_alone(loaded: LoadedAsrModel) -> None:
    good = [_request(f"g{i}", 0.7 + 0.9 * i, 10, seed=60 + i) for i in range(3)]
    expected = _reference(loaded, good)
    nan_audio = (0.1 * np.random.default_rng(1).standard_normal(16000)).astype(np.float32)
    nan_audio[100:200] = np.nan
    bad = [
        DecodeRequest("bad-overflow", np.full(16000, 1e30, dtype=np.float32), DecodeOptions(None, "", 10)),
        DecodeRequest("bad-nan", nan_audio, DecodeOptions(None, "", 10)),
        DecodeRequest("bad-negative", np.full(8000, -1e30, dtype=np.float32), DecodeOptions(None, "", 10)),
    ]
    engine = _torch_engine(loaded)
    for request in [good[0], bad[0], good[1], bad[1], bad[2], good[2]]:
        engine.add(_item(request))
    by_id = {o.request_id: o for o in _drain(engine)}
    for request in bad:
        error = by_id[request.request_id].error
        assert isinstance(error, InvalidInput) and "not finite" in str(error)
    got = {}
    for request in good:
        output = by_id[request.request_id]
        assert output.error is None and output.result is not None
        got[request.request_id] = output.result.token_ids
    assert got == expected


def test_auto_features_are_torch_on_cuda_and_the_reference_elsewhere(loaded: LoadedAsrModel) -> None:
    from asr_server.engine.continuous.model_runner import resolve_features

    assert resolve_features("auto", torch.device("cuda", 0)) == "torch"
    assert resolve_features("auto", torch.device("cpu")) == "reference"
    assert resolve_features("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="features must be"):
        resolve_features("gpu", torch.device("cpu"))
    engine = ContinuousEngine(loaded, ContinuousConfig(max_running=2, page_size=16, kv_cache_tokens=1024))
    # On the CPU the default keeps the features on the preprocess threads, as the reference computes them.
    assert not engine._runner.features_on_device and engine._preparer._torch is None
    prepared = engine._preparer(_request("d", 1.0, 4, seed=9))
    assert prepared.input_features is not None
    engine.close()


def test_audio_token_counts_equal_the_processors_when_repeated_and_after_the_cache_fills(
    loaded: LoadedAsrModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The counts are cached per frame count; a cache that filled up is cleared, never grows without bound.
    monkeypatch.setattr(features_module, "_MAX_CACHED_COUNTS", 8)
    extractor = TorchFeatureExtractor(loaded.processor, n_window=N_WINDOW)
    hop = int(loaded.processor.feature_extractor.hop_length)
    samples = [1, 159, 160, 1_599, 16_000, 16_161, 31_999, 80_000, 128_000, 128_159, 480_000]
    for _ in range(2):
        for n in samples:
            frames = max(n, int(loaded.processor.feature_extractor.min_length)) // hop
            expected = int(loaded.processor._get_audio_token_length(torch.tensor([frames]), N_WINDOW)[0])
            assert extractor.num_audio_tokens(n) == expected
        assert len(extractor._tokens_by_frames) <= 8
