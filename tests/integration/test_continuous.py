"""Parity of the continuous-batching engine with `model.generate` run on each request alone (tiny checkpoint, fp32,
CPU): random arrival times, mixed lengths, per-request budgets, EOS, forced lengths, prefixes, cancellations
mid-decode and admission limits (rows and KV pages)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from asr_server.engine.bench_mode import ForcedTokensCore, forced_tokens
from asr_server.engine.continuous.core import ContinuousConfig, ContinuousEngine
from asr_server.engine.continuous.prepare import FastPreparer
from asr_server.engine.core import EngineOutput
from asr_server.engine.generate_core import GenerateEngine, PreparedInputs, prepare_single
from asr_server.engine.types import DecodeOptions, DecodeRequest, WorkItem
from asr_server.errors import LimitExceeded
from asr_server.models.loading import LoadedAsrModel, load_asr_model


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints: Any) -> LoadedAsrModel:
    return load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cpu")


def _request(
    rid: str,
    seconds: float,
    max_new: int,
    seed: int,
    *,
    language: str | None = None,
    prefix: str = "",
    forced: int | None = None,
) -> DecodeRequest:
    audio = (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)
    options = DecodeOptions(language=language, context="", max_new_tokens=max_new)
    return DecodeRequest(rid, audio, options, prefix_text=prefix, forced_num_tokens=forced)


def _item(request: DecodeRequest) -> WorkItem:
    return WorkItem(request, time.time_ns(), time.monotonic())


def _reference(loaded: LoadedAsrModel, requests: list[DecodeRequest]) -> dict[str, tuple[int, ...]]:
    """Each request through `model.generate` alone (a batch of one)."""
    engine = GenerateEngine(loaded, max_batch_size=1)
    out: dict[str, tuple[int, ...]] = {}
    for request in requests:
        (result,) = engine._run_batch([_item(request)])
        assert result.result is not None
        out[request.request_id] = result.result.token_ids
    return out


def _drain(engine: ContinuousEngine | ForcedTokensCore) -> Iterator[EngineOutput]:
    while engine.num_waiting() or engine.num_running():
        yield from engine.step()


def _tokens(outputs: list[EngineOutput]) -> dict[str, tuple[int, ...]]:
    got = {}
    for o in outputs:
        assert o.error is None, o.error
        assert o.result is not None
        got[o.request_id] = o.result.token_ids
    return got


@pytest.mark.parametrize(
    ("seconds", "language", "context", "prefix"),
    [
        (0.2, None, "", ""),
        (0.99, None, "", ""),
        (5.0, "English", "", ""),
        (29.95, None, "names: Ada", ""),
        (31.0, None, "", "language English<asr_text>he"),
    ],
)
def test_fast_preprocessing_equals_the_reference(
    loaded: LoadedAsrModel, seconds: float, language: str | None, context: str, prefix: str
) -> None:
    request = _request("p", seconds, 10, seed=11, language=language, prefix=prefix)
    request = DecodeRequest("p", request.audio_16k, DecodeOptions(language, context, 10), prefix_text=prefix)
    reference = prepare_single(loaded, request)
    fast = FastPreparer(loaded)(request)
    assert torch.equal(fast.input_ids, reference.input_ids)
    assert torch.equal(fast.input_features, reference.input_features)
    assert torch.equal(fast.input_features_mask, reference.input_features_mask)


def test_interims_with_new_prefixes_reuse_one_template_and_the_cache_is_bounded(loaded: LoadedAsrModel) -> None:
    # A stream's interims each carry a different continuation prefix; they must share the (language, context)
    # template (a miss costs a full reference run) and still equal the reference token for token.
    preparer = FastPreparer(loaded, max_templates=3)
    prefixes = [
        "",
        "language English<asr_text>he",
        "language English<asr_text>hello wor",
        "language English<asr_text>hello world, how",
    ]
    for i, prefix in enumerate(prefixes):
        request = DecodeRequest(
            "p", _request("p", 1.0 + i, 10, seed=i).audio_16k, DecodeOptions(None, "", 10), prefix_text=prefix
        )
        assert torch.equal(preparer(request).input_ids, prepare_single(loaded, request).input_ids)
    assert preparer.cached_templates == 1
    # Contexts are caller text: distinct ones evict the least recently used instead of growing the cache.
    for context in ["a", "b", "c", "d", "e"]:
        preparer(DecodeRequest("p", _request("p", 1.0, 10, seed=1).audio_16k, DecodeOptions(None, context, 10)))
    assert preparer.cached_templates == 3


_PREFILL_MODES = pytest.mark.parametrize("async_prefill", ["off", "on"])


@_PREFILL_MODES
def test_random_arrivals_mixed_lengths_and_row_and_page_limits(loaded: LoadedAsrModel, async_prefill: Any) -> None:
    rng = random.Random(7)
    requests = [
        _request(f"r{i}", seconds, max_new, seed=i)
        for i, (seconds, max_new) in enumerate(
            [(0.3, 12), (2.5, 30), (0.8, 5), (4.0, 24), (1.2, 1), (3.1, 18), (0.6, 27), (1.9, 9)]
        )
    ]
    expected = _reference(loaded, requests)
    # 3 rows and 24 pages of 16 tokens: admission is bounded by rows and by pages, and pages are reused.
    engine = ContinuousEngine(
        loaded, ContinuousConfig(max_running=3, page_size=16, kv_cache_tokens=24 * 16, async_prefill=async_prefill)
    )
    assert engine._async_prefill is (async_prefill == "on")
    pending = list(requests)
    outputs: list[EngineOutput] = []
    while pending or engine.num_waiting() or engine.num_running():
        for _ in range(rng.randint(0, 2)):
            if pending:
                engine.add(_item(pending.pop(0)))
        if engine.num_waiting() or engine.num_running():
            outputs.extend(engine.step())
        assert engine.num_running() <= 3
    assert _tokens(outputs) == expected
    # Every page and row came back.
    assert len(engine._free_pages) == engine._cache.num_pages - 1
    assert len(engine._free_rows) == 3


@pytest.mark.parametrize(("max_step_tokens", "features"), [(0, "reference"), (20, "torch")])
def test_lazy_pages_with_preemption_by_recompute_give_the_reference_tokens(
    loaded: LoadedAsrModel, max_step_tokens: int, features: str
) -> None:
    # 14 pages of 16 tokens for 4 rows of requests needing up to 6 pages each: pages run out mid-decode, the latest
    # admitted request is preempted and later prefilled again over its prompt and the tokens it had (in chunks of
    # at most 20 tokens a step with chunked prefill, the recomputed generated tokens included).
    requests = [
        _request(f"z{i}", seconds, max_new, seed=400 + i)
        for i, (seconds, max_new) in enumerate([(0.3, 40), (2.5, 60), (0.8, 50), (4.0, 64), (1.2, 30), (3.1, 48)])
    ]
    expected = _reference(loaded, requests)
    config = ContinuousConfig(
        max_running=4,
        page_size=16,
        kv_cache_tokens=14 * 16,
        kv_reservation="lazy",
        max_step_tokens=max_step_tokens,
        features=features,  # type: ignore[arg-type]
    )
    engine = ContinuousEngine(loaded, config)
    schedule = engine._scheduler.schedule
    preempted: list[str] = []

    def counting(now_s: float, **kwargs: Any) -> Any:
        plan = schedule(now_s, **kwargs)
        preempted.extend(p.request_id for p in plan.preempted)
        return plan

    engine._scheduler.schedule = counting  # type: ignore[method-assign]
    for request in requests:
        engine.add(_item(request))
    assert _tokens(list(_drain(engine))) == expected
    assert preempted, "the cache was meant to run out"
    assert len(engine._free_pages) == engine._cache.num_pages - 1
    assert len(engine._free_rows) == 4


@pytest.mark.parametrize("features", ["reference", "torch"])
def test_chunked_prefill_with_a_small_step_budget_gives_the_reference_tokens(
    loaded: LoadedAsrModel, features: str
) -> None:
    # A 24-token step budget: every prompt here (27-150 tokens; 9.3 s spans two 8 s encoder windows) is prefilled in
    # chunks over several steps, beside the decodes of the requests already running, arriving at different steps.
    requests = [
        _request("c0", 0.3, 30, seed=500),
        _request("c1", 9.3, 20, seed=501),
        _request("c2", 2.5, 25, seed=502, language="English"),
        _request("c3", 0.8, 12, seed=503, prefix="language English<asr_text>he"),
        _request("c4", 6.2, 18, seed=504),
        _request("c5", 1.4, 22, seed=505),
    ]
    expected = _reference(loaded, requests)
    config = ContinuousConfig(
        max_running=4,
        page_size=16,
        kv_cache_tokens=4096,
        max_step_tokens=24,
        features=features,  # type: ignore[arg-type]
    )
    engine = ContinuousEngine(loaded, config)
    assert (engine._preparer._torch is not None) == (features == "torch")
    schedule = engine._scheduler.schedule
    plans: list[Any] = []

    def recording(now_s: float, **kwargs: Any) -> Any:
        plans.append(schedule(now_s, **kwargs))
        return plans[-1]

    engine._scheduler.schedule = recording  # type: ignore[method-assign]
    arrivals = {0: ["c0"], 2: ["c1", "c2"], 5: ["c3"], 9: ["c4"], 10: ["c5"]}
    by_id = {r.request_id: r for r in requests}
    outputs: list[EngineOutput] = []
    step = 0
    while step <= max(arrivals) or engine.num_waiting() or engine.num_running():
        for rid in arrivals.get(step, []):
            engine.add(_item(by_id[rid]))
        outputs.extend(engine.step())
        step += 1
    assert _tokens(outputs) == expected
    assert max(p.num_tokens for p in plans) <= 24
    # Prompts were split, and partial chunks ran in steps that also decoded other requests.
    assert any(not w.completes for p in plans for w in p.prefills)
    assert any(p.decodes and any(not w.completes for w in p.prefills) for p in plans)
    assert len(engine._free_pages) == engine._cache.num_pages - 1 and len(engine._free_rows) == 4


def test_eos_ends_each_request_on_its_own(loaded: LoadedAsrModel) -> None:
    # The tiny model rarely says EOS; declare its favourite token an EOS so requests end early, at different steps.
    generation = loaded.model.generation_config
    saved = generation.eos_token_id
    requests = [_request(f"e{i}", 0.5 + 0.7 * i, 40, seed=100 + i) for i in range(5)]
    try:
        probe = _reference(loaded, requests[:1])["e0"]
        generation.eos_token_id = [*list(saved), probe[2]]
        expected = _reference(loaded, requests)
        engine = ContinuousEngine(loaded, ContinuousConfig(max_running=4, page_size=16, kv_cache_tokens=4096))
        for request in requests:
            engine.add(_item(request))
        got = _tokens(list(_drain(engine)))
    finally:
        generation.eos_token_id = saved
    assert got == expected
    assert any(len(ids) < 40 for ids in got.values())


def test_forced_lengths_prefix_and_language(loaded: LoadedAsrModel) -> None:
    requests = [
        _request("f0", 1.0, 4096, seed=1, forced=17),
        _request("p0", 2.0, 15, seed=2, prefix="language English<asr_text>he"),
        _request("l0", 1.5, 15, seed=3, language="English"),
        _request("f1", 0.4, 4096, seed=4, forced=9),
    ]
    expected = _reference(loaded, requests)
    engine = ContinuousEngine(loaded, ContinuousConfig(max_running=8, page_size=16, kv_cache_tokens=4096))
    for request in requests:
        engine.add(_item(request))
    outputs = list(_drain(engine))
    assert _tokens(outputs) == expected
    assert len(expected["f0"]) == 17 and len(expected["f1"]) == 9
    texts = {o.request_id: o.result for o in outputs if o.result is not None}
    assert texts["l0"].language == "English"


@_PREFILL_MODES
def test_cancellation_mid_decode_leaves_the_others_exact(loaded: LoadedAsrModel, async_prefill: Any) -> None:
    requests = [_request(f"c{i}", 1.0 + 0.5 * i, 25, seed=200 + i) for i in range(4)]
    expected = _reference(loaded, requests)
    engine = ContinuousEngine(
        loaded, ContinuousConfig(max_running=4, page_size=16, kv_cache_tokens=4096, async_prefill=async_prefill)
    )
    for request in requests:
        engine.add(_item(request))
    outputs: list[EngineOutput] = []
    for _ in range(6):
        outputs.extend(engine.step())
    engine.abort("c1")
    engine.abort("c3")
    outputs.extend(_drain(engine))
    got = _tokens(outputs)
    assert set(got) == {"c0", "c2"}
    assert got["c0"] == expected["c0"] and got["c2"] == expected["c2"]
    assert len(engine._free_pages) == engine._cache.num_pages - 1


@_PREFILL_MODES
def test_a_request_whose_prefill_fails_fails_alone(loaded: LoadedAsrModel, async_prefill: Any) -> None:
    requests = [_request(f"g{i}", 1.0 + 0.5 * i, 12, seed=300 + i) for i in range(3)]
    expected = _reference(loaded, [r for r in requests if r.request_id != "g1"])
    engine = ContinuousEngine(
        loaded, ContinuousConfig(max_running=4, page_size=16, kv_cache_tokens=4096, async_prefill=async_prefill)
    )
    preparer = engine._preparer

    def poisoned(request: DecodeRequest) -> PreparedInputs:
        prepared = preparer(request)
        if request.request_id != "g1":
            return prepared
        # A token id past the vocabulary: the embedding lookup of the whole prefill group raises.
        ids = prepared.input_ids.clone()
        ids[0, -1] = 10**9
        return PreparedInputs(ids, prepared.input_features, prepared.input_features_mask)

    engine._preparer = poisoned  # type: ignore[assignment]
    for request in requests:
        engine.add(_item(request))
    outputs = list(_drain(engine))
    failed = [o for o in outputs if o.error is not None]
    assert [o.request_id for o in failed] == ["g1"] and "inference failed" in str(failed[0].error)
    assert _tokens([o for o in outputs if o.error is None]) == expected
    assert len(engine._free_pages) == engine._cache.num_pages - 1


def test_abort_while_waiting_and_too_large_request(loaded: LoadedAsrModel) -> None:
    engine = ContinuousEngine(loaded, ContinuousConfig(max_running=1, page_size=16, kv_cache_tokens=256))
    engine.add(_item(_request("big", 1.0, 4000, seed=5)))
    engine.add(_item(_request("w0", 0.5, 3, seed=6)))
    engine.add(_item(_request("w1", 0.5, 3, seed=7)))
    engine.abort("w1")
    outputs = list(_drain(engine))
    by_id = {o.request_id: o for o in outputs}
    assert set(by_id) == {"big", "w0"}
    assert isinstance(by_id["big"].error, LimitExceeded)
    assert by_id["w0"].result is not None and len(by_id["w0"].result.token_ids) <= 3


def test_bench_mode_forces_tokens_per_audio_second(loaded: LoadedAsrModel) -> None:
    engine = ForcedTokensCore(
        ContinuousEngine(loaded, ContinuousConfig(max_running=2, page_size=16, kv_cache_tokens=2048)), 4.0
    )
    engine.add(_item(_request("b0", 2.0, 3, seed=8)))
    (output,) = list(_drain(engine))
    assert output.result is not None
    assert len(output.result.token_ids) == forced_tokens(2.0, 4.0) == 14


def test_bench_mode_counts_an_assistant_prefix_as_written(loaded: LoadedAsrModel) -> None:
    # A live interim's prefix is text the model has already written: it generates only the rest (at least one).
    tokenizer = loaded.processor.tokenizer

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    config = ContinuousConfig(max_running=2, page_size=16, kv_cache_tokens=2048)
    engine = ForcedTokensCore(ContinuousEngine(loaded, config), 4.0, count)
    prefix = "language English<asr_text>hello there"
    engine.add(_item(_request("short", 2.0, 3, seed=8, prefix=prefix)))
    engine.add(_item(_request("long", 2.0, 3, seed=8, prefix=prefix * 4)))
    outputs = {o.request_id: o.result for o in _drain(engine)}
    assert 0 < count(prefix) < 14
    assert outputs["short"] is not None and len(outputs["short"].token_ids) == 14 - count(prefix)
    assert outputs["long"] is not None and len(outputs["long"].token_ids) == 1


_INTERPRETER_SCRIPT = """
import sys, time
import numpy as np
from asr_server.engine.continuous.core import ContinuousConfig, ContinuousEngine
from asr_server.engine.generate_core import GenerateEngine
from asr_server.engine.types import DecodeOptions, DecodeRequest, WorkItem
from asr_server.models.loading import load_asr_model

loaded = load_asr_model(sys.argv[1], dtype="float32", device="cpu")
requests = [
    DecodeRequest(f"t{i}", (0.1 * np.random.default_rng(i).standard_normal(8000 * (i + 1))).astype(np.float32),
                  DecodeOptions(None, "", 6))
    for i in range(2)
]
reference = {}
for r in requests:
    (out,) = GenerateEngine(loaded, max_batch_size=1)._run_batch([WorkItem(r, time.time_ns(), time.monotonic())])
    reference[r.request_id] = out.result.token_ids
engine = ContinuousEngine(loaded, ContinuousConfig(max_running=2, page_size=16, kv_cache_tokens=1024, kernels="triton"))
for r in requests:
    engine.add(WorkItem(r, time.time_ns(), time.monotonic()))
got = {}
while engine.num_waiting() or engine.num_running():
    for o in engine.step():
        got[o.request_id] = o.result.token_ids
print("MATCH" if got == reference else f"DIFF {got} {reference}")
# Pages left full of NaN by an earlier owner (slots past each row's length, and the prefill's padding) must not
# reach a request's output: the same requests again over a cache poisoned everywhere.
for layer in range(len(engine._cache.keys)):
    engine._cache.keys[layer].fill_(float("nan"))
    engine._cache.values[layer].fill_(float("nan"))
for r in requests:
    engine.add(WorkItem(r, time.time_ns(), time.monotonic()))
got = {}
while engine.num_waiting() or engine.num_running():
    for o in engine.step():
        got[o.request_id] = o.result.token_ids
print("NAN-ISOLATED" if got == reference else f"NAN-LEAK {got} {reference}")
# Chunked prefill through the fused path (chunks that continue a prompt attend through its pages), the cache still
# full of NaN from above.
config = ContinuousConfig(max_running=2, page_size=16, kv_cache_tokens=1024, kernels="triton", max_step_tokens=12)
engine = ContinuousEngine(loaded, config)
for layer in range(len(engine._cache.keys)):
    engine._cache.keys[layer].fill_(float("nan"))
    engine._cache.values[layer].fill_(float("nan"))
for r in requests:
    engine.add(WorkItem(r, time.time_ns(), time.monotonic()))
got = {}
while engine.num_waiting() or engine.num_running():
    for o in engine.step():
        got[o.request_id] = o.result.token_ids
chunks = engine.prefill_chunks
print("CHUNKED-MATCH" if got == reference and chunks > 2 else f"CHUNKED-DIFF {chunks} {got} {reference}")
"""


def test_fused_kernels_match_in_the_triton_interpreter(tiny_checkpoints: Any) -> None:
    """The CUDA path's Triton kernels (fused norms, RoPE, cache writes, paged attention) run in Triton's CPU
    interpreter and give generate's tokens. Triton comes with the dev extra; skipped only where it cannot be
    installed (not Linux x86-64)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT, str(tiny_checkpoints.asr_hf)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert "MATCH" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "NAN-ISOLATED" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "CHUNKED-MATCH" in done.stdout, done.stdout + done.stderr[-2000:]


def test_a_released_row_is_inactive_on_the_device_before_the_next_decode_step(loaded: LoadedAsrModel) -> None:
    """Row releases reach the device in one batch (runner._flush_released), but always before the next decode
    step: a row still active there would decode into pages the scheduler may already have given to a prompt
    that a side prefill is writing. The long request keeps the engine decoding after the short one ends."""
    long, short = _request("long", 1.0, 30, seed=41, forced=30), _request("short", 1.0, 2, seed=42, forced=2)
    engine = ContinuousEngine(loaded, ContinuousConfig(max_running=4, page_size=16, kv_cache_tokens=4096))
    runner = engine._runner
    released: list[int] = []
    release = runner.release_row

    def recorded(row: int) -> None:
        if runner.is_live(row):
            released.append(row)
        release(row)

    runner.release_row = recorded  # type: ignore[method-assign]
    engine.add(_item(long))
    engine.add(_item(short))
    outputs: list[EngineOutput] = []
    while not any(o.request_id == "short" for o in outputs):
        outputs.extend(engine.step())
    (row,) = released
    decoded = runner.decode
    launches: list[tuple[bool, int]] = []

    def checked(rows: int, max_pages: int) -> Any:
        sampled = decoded(rows, max_pages)
        launches.append((bool(runner.buffers.active[row]), int(runner.buffers.block_table[row].abs().sum())))
        return sampled

    runner.decode = checked  # type: ignore[method-assign]
    outputs.extend(_drain(engine))
    assert launches and all(state == (False, 0) for state in launches), launches
    assert _tokens(outputs) == _reference(loaded, [long, short])


def test_async_prefill_runs_beside_decodes_and_an_abort_meanwhile_frees_its_row(loaded: LoadedAsrModel) -> None:
    """Async prefill: while a prefill is held on its thread, the rows already running keep decoding (their
    tokens grow), a request aborted meanwhile never gets a row when the prefill lands, and every result equals
    the reference."""
    import threading

    requests = [_request(f"s{i}", 1.0 + 0.4 * i, 20, seed=500 + i) for i in range(4)]
    expected = _reference(loaded, requests)
    engine = ContinuousEngine(
        loaded, ContinuousConfig(max_running=4, page_size=16, kv_cache_tokens=4096, async_prefill="on")
    )
    runner = engine._runner
    gate = threading.Event()
    original = runner.prefill_on_side
    calls: list[list[str]] = []

    def held(inputs: Any, after: Any) -> Any:
        calls.append([item.work.request_id for item in inputs])
        if len(calls) == 2:
            assert gate.wait(30)
        return original(inputs, after)

    runner.prefill_on_side = held  # type: ignore[method-assign]
    engine.add(_item(requests[0]))
    outputs: list[EngineOutput] = []
    while not engine._runner.num_live_rows():
        outputs.extend(engine.step())
    for request in requests[1:]:
        engine.add(_item(request))
    while len(calls) < 2:
        outputs.extend(engine.step())
    before = len(engine._requests["s0"].output.tokens)
    for _ in range(5):
        outputs.extend(engine.step())
    assert len(engine._requests["s0"].output.tokens) > before  # decoding went on beside the held prefill
    engine.abort("s2")
    gate.set()
    outputs.extend(_drain(engine))
    got = _tokens(outputs)
    assert set(got) == {"s0", "s1", "s3"}
    assert all(got[rid] == expected[rid] for rid in got)
    assert len(engine._free_pages) == engine._cache.num_pages - 1
    assert len(engine._free_rows) == 4
    engine.close()
