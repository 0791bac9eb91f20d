"""Token log-probabilities (result confidence) from both model engines on the tiny checkpoint (fp32, CPU): the
continuous engine computes them inside its decode step, the generate engine from generate's raw logits; both equal
an independent teacher-forced forward pass over the same tokens."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pytest
import torch

from asr_server.engine.continuous.core import ContinuousConfig, ContinuousEngine
from asr_server.engine.generate_core import GenerateEngine, prepare_single
from asr_server.engine.types import DecodeOptions, DecodeRequest, DecodeResult, WorkItem
from asr_server.models.loading import LoadedAsrModel, load_asr_model


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints: Any) -> LoadedAsrModel:
    return load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cpu")


def _request(rid: str, seconds: float, seed: int, language: str | None = None, prefix: str = "") -> DecodeRequest:
    audio = (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)
    return DecodeRequest(rid, audio, DecodeOptions(language, "", 16), prefix_text=prefix)


REQUESTS = [
    _request("detect", 2.0, 1),
    _request("forced", 3.1, 2, language="English"),
    _request("short", 0.4, 3),
    _request("prefix", 2.5, 4, prefix="language English<asr_text>he"),
]


def _item(request: DecodeRequest) -> WorkItem:
    return WorkItem(request, time.time_ns(), time.monotonic())


def _generate(loaded: LoadedAsrModel) -> dict[str, DecodeResult]:
    engine = GenerateEngine(loaded, max_batch_size=4)
    for r in REQUESTS:
        engine.add(_item(r))
    out = {}
    for o in engine.step():
        assert o.result is not None, o.error
        out[o.request_id] = o.result
    return out


def _continuous(loaded: LoadedAsrModel) -> dict[str, DecodeResult]:
    engine = ContinuousEngine(loaded, ContinuousConfig(max_running=4, kv_cache_tokens=8192, page_size=16))
    for r in REQUESTS:
        engine.add(_item(r))
    out = {}
    while engine.num_waiting() or engine.num_running():
        for o in engine.step():
            assert o.result is not None, o.error
            out[o.request_id] = o.result
    engine.close()
    return out


def _teacher_forced(loaded: LoadedAsrModel, request: DecodeRequest, ids: tuple[int, ...]) -> list[float]:
    """log p(token_t | prompt, tokens before t) from one forward pass over the prompt and all generated tokens."""
    prepared = prepare_single(loaded, request)
    prompt = prepared.input_ids
    full = torch.cat([prompt, torch.tensor([ids], dtype=prompt.dtype)], dim=1)
    with torch.inference_mode():
        logits = loaded.model(
            input_ids=full,
            attention_mask=torch.ones_like(full),
            input_features=prepared.input_features,
            input_features_mask=prepared.input_features_mask,
        ).logits[0]
    start = prompt.shape[1] - 1
    logprobs = torch.log_softmax(logits[start : start + len(ids)].double(), dim=-1)
    return [float(logprobs[t, token]) for t, token in enumerate(ids)]


def test_both_engines_report_each_tokens_log_probability_as_a_teacher_forced_pass_gives_it(
    loaded: LoadedAsrModel,
) -> None:
    generated = _generate(loaded)
    continuous = _continuous(loaded)
    for request in REQUESTS:
        g, c = generated[request.request_id], continuous[request.request_id]
        assert c.token_ids == g.token_ids
        assert len(g.token_logprobs) == len(g.token_ids) == len(c.token_logprobs)
        expected = _teacher_forced(loaded, request, g.token_ids)
        assert g.token_logprobs == pytest.approx(expected, abs=1e-4)
        assert c.token_logprobs == pytest.approx(expected, abs=1e-4)
        assert c.text_tokens == g.text_tokens
        # What each text token adds to the decoded text (word confidence reads words off these).
        assert c.text_token_pieces == g.text_token_pieces
        start, end = g.text_tokens
        assert len(g.text_token_pieces) == end - start
        text_ids = list(g.token_ids[start:end])
        assert "".join(g.text_token_pieces) == loaded.processor.tokenizer.decode(text_ids, skip_special_tokens=True)
        # Greedy tokens: each is the most likely, so never below 1 / vocabulary; all are probabilities.
        vocab = loaded.model.config.text_config.vocab_size
        assert all(-math.log(vocab) - 1e-4 <= lp <= 0.0 for lp in g.token_logprobs)


def test_the_text_span_leaves_out_the_detected_language_tag_and_the_eos(loaded: LoadedAsrModel) -> None:
    results = _generate(loaded)
    tokenizer = loaded.processor.tokenizer
    asr_text = tokenizer.convert_tokens_to_ids("<asr_text>")
    for request in REQUESTS:
        result = results[request.request_id]
        start, end = result.text_tokens
        ids = list(result.token_ids)
        if request.options.language is None and not request.prefix_text and asr_text in ids:
            assert start == ids.index(asr_text) + 1
        else:
            assert start == 0 or ids[start - 1] == asr_text
        assert asr_text not in ids[start:end]
        assert all(t not in (tokenizer.eos_token_id, tokenizer.pad_token_id) for t in ids[start:end])
        probs = result.text_token_probs
        assert len(probs) == end - start and all(0.0 < p <= 1.0 for p in probs)
