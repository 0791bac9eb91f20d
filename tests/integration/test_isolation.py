"""A request never changes another request's result (tiny checkpoint, fp32, CPU, both engine cores).

The path that broke it: a FLOAT32 clip of 1e30 samples turned its whole log-mel into NaN, the model wrote NaN keys
and values into its KV pages, and later requests given those pages (continuous engine) read the stale NaN in the
slots past their own length: their softmax weights there were 0, and 0 x NaN is NaN. Both ends are closed: the audio
layer refuses such samples (tests/unit/test_audio_decode.py), the engines refuse non-finite features per request,
and no attention kernel lets a slot a request has not written reach its output.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from asr_server.engine.continuous.core import ContinuousConfig, ContinuousEngine
from asr_server.engine.core import EngineCore, EngineOutput
from asr_server.engine.generate_core import GenerateEngine
from asr_server.engine.types import DecodeOptions, DecodeRequest, WorkItem
from asr_server.errors import InvalidInput
from asr_server.models.loading import LoadedAsrModel, load_asr_model

ORDINARY_REQUESTS = 200
DISTINCT_CLIPS = 24


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints: Any) -> LoadedAsrModel:
    return load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cpu")


def _clip(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(rng.uniform(0.3, 2.5) * 16000))).astype(np.float32)


def _request(rid: str, audio: np.ndarray, max_new: int = 12) -> DecodeRequest:
    return DecodeRequest(rid, audio, DecodeOptions(language=None, context="", max_new_tokens=max_new))


def _item(request: DecodeRequest) -> WorkItem:
    return WorkItem(request, time.time_ns(), time.monotonic())


def _solo_baseline(loaded: LoadedAsrModel, clips: list[np.ndarray]) -> list[tuple[int, ...]]:
    engine = GenerateEngine(loaded, max_batch_size=1)
    baseline = []
    for index, clip in enumerate(clips):
        (output,) = engine._run_batch([_item(_request(f"solo{index}", clip))])
        assert output.result is not None
        baseline.append(output.result.token_ids)
    return baseline


def _run_at_random_times(core: EngineCore, requests: list[DecodeRequest], seed: int) -> dict[str, EngineOutput]:
    """Adds 0-3 requests before each step (some alone, some joining running batches) until all are answered."""
    rng = random.Random(seed)
    waiting = list(requests)
    outputs: dict[str, EngineOutput] = {}
    while waiting or core.num_waiting() or core.num_running():
        for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
            if waiting:
                core.add(_item(waiting.pop(0)))
        if not core.num_waiting() and not core.num_running():
            core.add(_item(waiting.pop(0)))
        for output in core.step():
            outputs[output.request_id] = output
    return outputs


def _bad_requests() -> list[DecodeRequest]:
    overflowing = np.full(16_000, 1e30, dtype=np.float32)
    not_finite = np.zeros(16_000, dtype=np.float32)
    not_finite[100:200] = np.nan
    return [_request("bad-overflow", overflowing), _request("bad-nan", not_finite)]


def _continuous(loaded: LoadedAsrModel) -> EngineCore:
    return ContinuousEngine(loaded, ContinuousConfig(max_running=6, page_size=16, kv_cache_tokens=2048))


def _generate(loaded: LoadedAsrModel) -> EngineCore:
    return GenerateEngine(loaded, max_batch_size=6)


@pytest.mark.parametrize("make_core", [_continuous, _generate], ids=["continuous", "generate"])
def test_after_bad_audio_200_ordinary_requests_equal_their_solo_baseline(
    loaded: LoadedAsrModel, make_core: Callable[[LoadedAsrModel], EngineCore]
) -> None:
    clips = [_clip(seed) for seed in range(DISTINCT_CLIPS)]
    baseline = _solo_baseline(loaded, clips)
    core = make_core(loaded)
    # The bad requests first, and again among the ordinary ones: each fails alone, precisely.
    rng = random.Random(7)
    ordinary = [_request(f"r{i}-c{i % DISTINCT_CLIPS}", clips[i % DISTINCT_CLIPS]) for i in range(ORDINARY_REQUESTS)]
    mixed: list[DecodeRequest] = [*_bad_requests()]
    for request in ordinary:
        mixed.append(request)
        if rng.random() < 0.05:
            mixed.append(_request(f"bad-{len(mixed)}", np.full(8_000, -1e30, dtype=np.float32)))
    outputs = _run_at_random_times(core, mixed, seed=11)
    bad = [r for r in mixed if r.request_id.startswith("bad")]
    assert len(bad) > 2
    for request in bad:
        error = outputs[request.request_id].error
        assert isinstance(error, InvalidInput) and "not finite" in str(error)
    mismatched = [
        r.request_id
        for r in ordinary
        if outputs[r.request_id].result is None
        or outputs[r.request_id].result.token_ids != baseline[int(r.request_id.rsplit("c", 1)[1])]  # type: ignore[union-attr]
    ]
    assert mismatched == []


def test_nan_left_in_reused_kv_pages_never_reaches_a_later_request(loaded: LoadedAsrModel) -> None:
    """The kernel end on its own: every page of the cache (slots past each request's length, the scratch page,
    and the prefill's padding) full of NaN, as a NaN request leaves its pages, and requests still equal baseline."""
    clips = [_clip(100 + seed) for seed in range(8)]
    baseline = _solo_baseline(loaded, clips)
    core = ContinuousEngine(loaded, ContinuousConfig(max_running=4, page_size=16, kv_cache_tokens=1024))
    for layer in range(len(core._cache.keys)):
        core._cache.keys[layer].fill_(float("nan"))
        core._cache.values[layer].fill_(float("nan"))
    requests = [_request(f"p{i}", clip) for i, clip in enumerate(clips)] * 3
    requests = [_request(f"{r.request_id}-{n}", r.audio_16k) for n, r in enumerate(requests)]
    outputs = _run_at_random_times(core, requests, seed=3)
    got = {r.request_id: outputs[r.request_id].result for r in requests}
    assert all(result is not None for result in got.values())
    assert [got[r.request_id].token_ids for r in requests] == [  # type: ignore[union-attr]
        baseline[int(r.request_id[1:].split("-")[0])] for r in requests
    ]
