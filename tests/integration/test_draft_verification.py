"""Greedy draft verification in the continuous engine (tiny checkpoint, fp32, CPU): a request's draft tokens are
prefilled after its prompt and the longest prefix greedy decoding agrees with is kept; whatever the draft (right,
partly right, wrong, too long, holding an EOS, none), the result equals `model.generate`'s token for token and
the engine's own result without a draft in its log-probabilities; an accepted draft saves decode steps."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from asr_server.engine.continuous.core import ContinuousConfig, ContinuousEngine
from asr_server.engine.core import EngineOutput
from asr_server.engine.generate_core import GenerateEngine
from asr_server.engine.types import DecodeOptions, DecodePriority, DecodeRequest, DecodeResult, WorkItem
from asr_server.models.loading import LoadedAsrModel, load_asr_model

_BUDGET = 12


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints: Any) -> LoadedAsrModel:
    return load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cpu")


def _request(rid: str, seed: int, draft: tuple[int, ...] = (), seconds: float = 2.0) -> DecodeRequest:
    audio = (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)
    options = DecodeOptions(language=None, context="", max_new_tokens=_BUDGET)
    return DecodeRequest(rid, audio, options, priority=DecodePriority.FINAL, draft_token_ids=draft)


def _engine(loaded: LoadedAsrModel, **config: Any) -> ContinuousEngine:
    settings: dict[str, Any] = {"max_running": 4, "page_size": 16, "kv_cache_tokens": 4096, **config}
    return ContinuousEngine(loaded, ContinuousConfig(**settings))


def _drain(engine: ContinuousEngine) -> Iterator[EngineOutput]:
    while engine.num_waiting() or engine.num_running():
        yield from engine.step()


def _run(engine: ContinuousEngine, requests: list[DecodeRequest]) -> dict[str, DecodeResult]:
    for request in requests:
        engine.add(WorkItem(request, time.time_ns(), time.monotonic()))
    results = {}
    for out in _drain(engine):
        assert out.error is None and out.result is not None, out.error
        results[out.request_id] = out.result
    return results


def _generate(loaded: LoadedAsrModel, request: DecodeRequest) -> tuple[int, ...]:
    (out,) = GenerateEngine(loaded, max_batch_size=1)._run_batch([WorkItem(request, time.time_ns(), 0.0)])
    assert out.result is not None
    return out.result.token_ids


def _drafts(reference: tuple[int, ...], eos: int) -> dict[str, tuple[int, ...]]:
    wrong = tuple((t + 1) % 1000 for t in reference)
    return {
        "none": (),
        "right": reference[: _BUDGET - 1],
        "right-to-the-end": reference,
        "wrong-at-2": reference[:2] + wrong[2:3] + reference[3:],
        "wrong-at-0": wrong,
        "short": reference[:3],
        "too-long": reference + reference,
        "eos-inside": reference[:4] + (eos,) + reference[4:],
    }


@pytest.mark.parametrize("async_prefill", ["off", "on"])
def test_every_draft_gives_the_result_without_one(loaded: LoadedAsrModel, async_prefill: str) -> None:
    plain = _request("plain", seed=3)  # a varied output (some seeds give one token repeated)
    reference = _generate(loaded, plain)
    alone = _run(_engine(loaded), [plain])["plain"]
    assert alone.token_ids == reference
    eos = loaded.model.generation_config.eos_token_id
    drafts = _drafts(reference, int(eos[0] if isinstance(eos, list) else eos))
    # All in one prefill (their rows side by side, drafts of different lengths), and each alone.
    requests = [_request(name, seed=3, draft=draft) for name, draft in drafts.items()]
    together = _run(_engine(loaded, async_prefill=async_prefill, max_running=len(requests)), requests)
    for name in drafts:
        result = together[name]
        assert result.token_ids == reference, name
        assert result.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-5), name
    for name in ("wrong-at-2", "right"):
        (result,) = _run(_engine(loaded, async_prefill=async_prefill), [_request(name, 3, drafts[name])]).values()
        assert result.token_ids == reference
        assert result.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-5)


def test_an_accepted_draft_saves_decode_steps(loaded: LoadedAsrModel) -> None:
    request = _request("r", seed=2)
    reference = _generate(loaded, request)
    steps = {}
    for name, draft, max_draft in (("none", (), 64), ("right", reference, 64), ("off", reference, 0)):
        engine = _engine(loaded, max_draft_tokens=max_draft)
        (result,) = _run(engine, [_request(name, seed=2, draft=draft)]).values()
        assert result.token_ids == reference
        steps[name] = engine.stats().steps
    # Without a draft (or with verification off) one decode step per token after the first; with the whole
    # output as a draft, the prefill yields it all (the step launched before the host sees the end aside).
    assert steps["none"] == steps["off"] >= len(reference) - 1
    assert steps["right"] <= 1


def test_a_drafted_request_aborted_during_its_prefill_leaves_the_others_right(loaded: LoadedAsrModel) -> None:
    base = _request("base", seed=2)
    reference = _generate(loaded, base)
    engine = _engine(loaded, async_prefill="on")
    requests = [
        _request("a", seed=2, draft=reference[:5]),
        _request("b", seed=2, draft=reference[:2] + (reference[2] + 1,)),
        _request("c", seed=2),
    ]
    for request in requests:
        engine.add(WorkItem(request, time.time_ns(), time.monotonic()))
    engine.step()  # the side prefill of all three starts
    engine.abort("b")
    results = {out.request_id: out for out in _drain(engine)}
    assert set(results) == {"a", "c"}
    for out in results.values():
        assert out.result is not None and out.result.token_ids == reference
