"""The padded-generate engine: one request that cannot be prepared or decoded fails alone (tiny checkpoint, CPU)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from asr_server.engine import generate_core
from asr_server.engine.generate_core import GenerateEngine, PreparedInputs, prepare_single
from asr_server.engine.types import DecodeOptions, DecodeRequest, WorkItem
from asr_server.models.loading import LoadedAsrModel, load_asr_model


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints: Any) -> LoadedAsrModel:
    return load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cpu")


def _item(rid: str, seconds: float, seed: int) -> WorkItem:
    audio = (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)
    request = DecodeRequest(rid, audio, DecodeOptions(language=None, context="", max_new_tokens=8))
    return WorkItem(request, time.time_ns(), time.monotonic())


def _alone(loaded: LoadedAsrModel, item: WorkItem) -> tuple[int, ...]:
    (output,) = GenerateEngine(loaded, max_batch_size=1)._run_batch([item])
    assert output.result is not None
    return output.result.token_ids


@pytest.mark.parametrize("fault", ["prepare", "decode"])
def test_a_bad_request_fails_alone_and_its_batch_mates_equal_their_solo_runs(
    loaded: LoadedAsrModel, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    items = [_item("a", 1.0, 1), _item("bad", 2.0, 2), _item("c", 3.0, 3)]
    expected = {w.request.request_id: _alone(loaded, w) for w in items if w.request.request_id != "bad"}

    def faulty(model: LoadedAsrModel, request: DecodeRequest) -> PreparedInputs:
        if request.request_id == "bad" and fault == "prepare":
            raise ValueError("cannot read this clip")
        prepared = prepare_single(model, request)
        if request.request_id == "bad":
            # A token id past the vocabulary: the embedding lookup of the whole padded batch raises.
            ids = prepared.input_ids.clone()
            ids[0, -1] = 10**9
            return PreparedInputs(ids, prepared.input_features, prepared.input_features_mask)
        return prepared

    monkeypatch.setattr(generate_core, "prepare_single", faulty)
    engine = GenerateEngine(loaded, max_batch_size=8)
    for item in items:
        engine.add(item)
    outputs = {o.request_id: o for o in engine.step()}
    assert set(outputs) == {"a", "bad", "c"}
    bad = outputs["bad"]
    assert bad.result is None and bad.error is not None and "inference failed" in str(bad.error)
    for rid, tokens in expected.items():
        result = outputs[rid].result
        assert result is not None and result.token_ids == tokens
