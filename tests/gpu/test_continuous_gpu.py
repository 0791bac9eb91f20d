"""GPU checks of the continuous engine's kernels (opt-in: `pytest -m gpu tests/gpu`, through the device tool)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("batch", [1, 7, 64, 128])
def test_paged_decode_attention_matches_the_reference(batch: int) -> None:
    from asr_server.engine.continuous.attention import (
        num_splits_for,
        paged_decode_attention_torch,
        paged_decode_attention_triton,
    )

    gen = torch.Generator(device="cuda").manual_seed(batch)
    heads, kv_heads, dim, page, pages = 16, 8, 128, 64, 16384
    k = torch.randn(pages, kv_heads, page, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(pages, kv_heads, page, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    lens = torch.randint(1, 2600, (batch,), device="cuda", dtype=torch.int32, generator=gen)
    table = (torch.randperm(pages - 1, device="cuda", generator=gen)[: batch * 64].reshape(batch, 64) + 1).int()
    max_pages = int((int(lens.max()) + page - 1) // page)
    ref = paged_decode_attention_torch(q.float(), k.float(), v.float(), table, lens, dim**-0.5, max_pages)
    splits = num_splits_for(batch, kv_heads, torch.cuda.get_device_properties(0).multi_processor_count)
    out = paged_decode_attention_triton(q, k, v, table, lens, dim**-0.5, splits).float()
    assert float((out - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float8_e4m3fn"])
def test_paged_prefill_attention_matches_the_reference(kv_dtype: str) -> None:
    """The real sizes (16 heads, 8 KV heads, 128 dims, 64-token pages): 90 chunks of live-stream lengths, a third
    after a reused prefix, against one float32 SDPA per chunk over the same (possibly fp8) cache."""
    from asr_server.engine.continuous.attention import (
        PrefillLayout,
        paged_prefill_attention_torch,
        paged_prefill_attention_triton,
        prefill_block_m,
    )

    gen = torch.Generator(device="cuda").manual_seed(7)
    heads, kv_heads, dim, page, num_pages = 16, 8, 128, 64, 4096
    dtype = getattr(torch, kv_dtype)
    k = torch.randn(num_pages, kv_heads, page, dim, device="cuda", generator=gen).to(dtype)
    v = torch.randn(num_pages, kv_heads, page, dim, device="cuda", generator=gen).to(dtype)
    cpu = torch.Generator().manual_seed(7)
    lengths = torch.randint(1, 400, (90,), generator=cpu).tolist()
    starts = [int(torch.randint(1, 300, (1,), generator=cpu)) if i % 3 == 0 else 0 for i in range(90)]
    order = (torch.randperm(num_pages - 1, generator=cpu) + 1).tolist()
    pages = []
    for n, s in zip(lengths, starts, strict=True):
        width = -(-(s + n) // page)
        pages.append([order.pop() for _ in range(width)])
    q = torch.randn(sum(lengths), heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    layout = PrefillLayout.build(lengths, starts, pages, page, prefill_block_m(heads // kv_heads), q.device)
    out = paged_prefill_attention_triton(q, k, v, layout, dim**-0.5).float()
    ref = paged_prefill_attention_torch(q.float(), k.float(), v.float(), lengths, starts, pages, dim**-0.5)
    assert float((out - ref).norm() / ref.norm()) < 1e-2


def test_fused_norm_and_silu_match_torch() -> None:
    from asr_server.engine.continuous import kernels

    x = torch.randn(37, 2048, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    out, res = kernels.add_rms_norm(x, r, w, 1e-6)
    s = x + r
    sf = s.float()
    expected = w * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(res, s)
    assert float((out.float() - expected.float()).norm() / expected.float().norm()) < 1e-2
    gu = torch.randn(37, 2 * 6144, device="cuda", dtype=torch.bfloat16)
    gate, up = gu.chunk(2, dim=-1)
    expected_mlp = torch.nn.functional.silu(gate) * up
    got = kernels.silu_mul(gu)
    assert float((got.float() - expected_mlp.float()).norm() / expected_mlp.float().norm()) < 1e-2


def test_the_encoder_never_waits_for_the_device(tiny_checkpoints: object) -> None:
    # Its indices come from the host-side mask (encoder.py): a `.item()`, boolean index or `nonzero` on the device
    # would stall the prefill thread until the convolutions are done. Sync debug mode raises on any such wait.
    from asr_server.engine.continuous.encoder import encode
    from asr_server.models.loading import load_asr_model

    loaded = load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cuda")  # type: ignore[attr-defined]
    tower = loaded.model.model.audio_tower
    chunk = tower.n_window * 2
    lengths = [1600, 799, 100, 1]
    frames = -(-max(lengths) // chunk) * chunk
    mask = (torch.arange(frames)[None, :] < torch.tensor(lengths)[:, None]).to(torch.long)
    features = torch.randn(len(lengths), tower.config.num_mel_bins, frames) * mask[:, None, :]
    with torch.inference_mode():
        expected = encode(tower.to("cpu"), features, mask)
        tower.to("cuda")
        on_device = features.to("cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = encode(tower, on_device, mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.shape == expected.shape
    assert float((out.cpu() - expected).abs().max()) < 1e-3


def test_a_prefill_never_waits_for_the_device(tiny_checkpoints: object) -> None:
    # The whole prefill of unkeyed clips (log-mel on the device, encoder, decoder with the fused kernels, the row
    # inserts) and the decode steps: any host read or blocking copy in them stalls the thread until the GPU has run
    # everything queued before, so host and device take turns instead of overlapping. Sync debug mode warns at
    # each; none may be left. Prefill in the engine thread (async off): nothing runs meanwhile whose waits count.
    import warnings

    from asr_server.engine.continuous.core import ContinuousConfig, ContinuousEngine
    from asr_server.models.loading import load_asr_model
    from tests.integration.test_features_torch import _drain, _item, _reference, _request

    loaded = load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cuda")  # type: ignore[attr-defined]
    config = ContinuousConfig(
        max_running=8, page_size=16, kv_cache_tokens=8192, features="torch", async_prefill="off", kernels="triton"
    )
    engine = ContinuousEngine(loaded, config)
    warm = _request("warm", 1.0, 4, seed=80)
    engine.add(_item(warm))
    list(_drain(engine))  # compiles the kernels outside the watch
    requests = [_request(f"r{i}", 0.7 + 0.9 * i, 10, seed=70 + i) for i in range(5)]
    expected = _reference(loaded, requests)
    runner = engine._runner
    waits: list[str] = []

    def watched(method: Any) -> Any:
        def run(*args: Any) -> Any:
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return method(*args)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    waits.extend(f"{method.__name__}: {w.filename}:{w.lineno}: {w.message}" for w in seen)

        return run

    # The prefill with its row inserts (the commit), and the decode steps with the batched row releases.
    runner.prefill = watched(runner.prefill)  # type: ignore[method-assign]
    runner.decode = watched(runner.decode)  # type: ignore[method-assign]
    for request in requests:
        engine.add(_item(request))
    got = {o.request_id: o.result.token_ids for o in _drain(engine) if o.result is not None}
    assert got == expected
    assert not waits, "\n".join(waits)


def test_a_stream_reuses_its_kv_prefix_on_the_device(tiny_checkpoints: object) -> None:
    # The CUDA path of the stream cache's KV prefixes: the fused kernels, the prefill on its side stream (async
    # prefill), the page copies: growing prefixes keyed give each prefix's own result, with fewer tokens prefilled.
    from asr_server.engine.continuous.core import ContinuousConfig, ContinuousEngine
    from asr_server.models.loading import load_asr_model
    from tests.integration.test_stream_cache import _pieces, _utterance

    loaded = load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cuda")  # type: ignore[attr-defined]

    def engine() -> ContinuousEngine:
        config = ContinuousConfig(max_running=4, page_size=16, kv_cache_tokens=8192, features="torch")
        return ContinuousEngine(loaded, config)

    audio = _utterance(26.0, seed=1)
    cuts = [3.0, 9.0, 17.0, 25.0]
    alone = _pieces(engine(), audio, cuts, None)
    keyed_engine = engine()
    keyed = _pieces(keyed_engine, audio, cuts, "g1/0/0")
    assert [r.token_ids for r, _, _ in keyed] == [r.token_ids for r, _, _ in alone]
    for (mine, _, _), (reference, _, _) in zip(keyed, alone, strict=True):
        assert mine.token_logprobs == pytest.approx(reference.token_logprobs, abs=1e-3)
    assert keyed_engine.stream_cache.prefix_hits == 3
    assert sum(p for _, _, p in keyed) < sum(p for _, _, p in alone) - 3 * 104


def test_drafts_are_verified_on_the_device(tiny_checkpoints: object) -> None:
    # The CUDA path of draft verification: the accepted length found on the device (no host wait), the rows'
    # positions from it, the prefill on its side stream: every draft gives model.generate's tokens.
    from asr_server.engine.continuous.core import ContinuousConfig, ContinuousEngine
    from asr_server.models.loading import load_asr_model
    from tests.integration.test_draft_verification import _drafts, _generate, _request, _run

    loaded = load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cuda")  # type: ignore[attr-defined]
    plain = _request("plain", seed=3)
    reference = _generate(loaded, plain)
    eos = loaded.model.generation_config.eos_token_id
    drafts = _drafts(reference, int(eos[0] if isinstance(eos, list) else eos))
    requests = [_request(name, seed=3, draft=draft) for name, draft in drafts.items()]
    config = ContinuousConfig(max_running=len(requests), page_size=16, kv_cache_tokens=8192, features="torch")
    engine = ContinuousEngine(loaded, config)
    results = _run(engine, requests)
    for name in drafts:
        assert results[name].token_ids == reference, name
