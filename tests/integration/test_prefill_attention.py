"""The fast prefill's attention (attention.paged_prefill_attention_triton): one launch for every chunk of a packed
prefill, each query reading its own request's keys from its pages. Run in Triton's CPU interpreter and checked
against attention computed from the dense K/V each request wrote (its reused prefix or earlier chunks, then the
chunk itself), with every slot nobody wrote holding NaN.

Triton picks the interpreter when it is imported, so the cases run in a child process started with
TRITON_INTERPRET=1 (`python -m tests.integration.test_prefill_attention`), which prints one line per case."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from asr_server.engine.continuous.attention import (
    PrefillLayout,
    paged_prefill_attention_torch,
    paged_prefill_attention_triton,
)

DIM, PAGE = 16, 16


def _dense_reference(
    q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: list[int], heads: int
) -> torch.Tensor:
    """Each request's last `lengths[c]` positions attending causally to all of its positions (dense, no pages)."""
    outs, begin = [], 0
    for n, k, v in zip(lengths, keys, values, strict=True):
        context = k.shape[0]
        rep = heads // k.shape[1]
        kd = k.transpose(0, 1).repeat_interleave(rep, dim=0)[None]
        vd = v.transpose(0, 1).repeat_interleave(rep, dim=0)[None]
        rows = torch.arange(n)[:, None] + (context - n)
        mask = torch.arange(context)[None, :] <= rows
        qi = q[begin : begin + n].transpose(0, 1)[None]
        outs.append(F.scaled_dot_product_attention(qi, kd, vd, attn_mask=mask, scale=DIM**-0.5)[0].transpose(0, 1))
        begin += n
    return torch.cat(outs)


def _scenario(
    lengths: list[int], starts: list[int], heads: int, kv_heads: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]], torch.Tensor]:
    """A NaN-filled paged cache holding each request's K/V for positions 0..start + n - 1 in shuffled pages, the
    packed queries, and the dense reference output."""
    gen = torch.Generator().manual_seed(seed)
    widths = [-(-(s + n) // PAGE) for n, s in zip(lengths, starts, strict=True)]
    page_ids = list(range(1, 1 + sum(widths) + 3))  # page 0 is scratch; a few pages nobody owns
    random.Random(seed).shuffle(page_ids)
    k_cache = torch.full((len(page_ids) + 1, kv_heads, PAGE, DIM), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    pages: list[list[int]] = []
    keys, values = [], []
    for n, s, width in zip(lengths, starts, widths, strict=True):
        owned = [page_ids.pop() for _ in range(width)]
        # A request may own more pages than its context needs (its generation budget): they hold NaN.
        pages.append(owned + [page_ids.pop()] if len(pages) % 2 else owned)
        k = torch.randn(s + n, kv_heads, DIM, generator=gen)
        v = torch.randn(s + n, kv_heads, DIM, generator=gen)
        for t in range(s + n):
            k_cache[owned[t // PAGE], :, t % PAGE] = k[t]
            v_cache[owned[t // PAGE], :, t % PAGE] = v[t]
        keys.append(k)
        values.append(v)
    q = torch.randn(sum(lengths), heads, DIM, generator=gen)
    return q, k_cache, v_cache, pages, _dense_reference(q, keys, values, lengths, heads)


# (lengths, starts, heads, kv_heads, block_m)
CASES: list[tuple[list[int], list[int], int, int, int]] = [
    ([5, 5, 5], [0, 0, 0], 4, 2, 16),  # whole prompts of one length
    ([7, 1, 40, 16], [0, 0, 0, 0], 4, 2, 16),  # mixed lengths; one spans three query blocks
    ([3, 20, 9], [16, 37, 0], 4, 2, 16),  # chunks after a prefix (a page edge, mid-page) beside a whole prompt
    ([6, 33], [5, 0], 6, 2, 16),  # a GQA group of 3 (padded to 4 rows per token)
    ([12, 4], [0, 30], 2, 2, 32),  # no GQA; a larger query block
]


def _run_case(lengths: list[int], starts: list[int], heads: int, kv_heads: int, block_m: int) -> str:
    q, k_cache, v_cache, pages, expected = _scenario(lengths, starts, heads, kv_heads, seed=sum(lengths))
    layout = PrefillLayout.build(lengths, starts, pages, PAGE, block_m, torch.device("cpu"))
    if layout.blocks.shape[0] != sum(-(-n // block_m) for n in lengths):
        return f"blocks {layout.blocks.tolist()}"
    got = paged_prefill_attention_triton(q, k_cache, v_cache, layout, DIM**-0.5)
    if torch.isnan(got).any():
        return "NaN in the output"
    reference = paged_prefill_attention_torch(q, k_cache, v_cache, lengths, starts, pages, DIM**-0.5)
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)
    error = float((got - expected).abs().max())
    return "ok" if error < 1e-4 else f"max error {error}"


def test_each_chunk_attends_causally_to_its_own_pages_only() -> None:
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_prefill_attention"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = done.stdout.splitlines()
    assert lines == [f"case {i}: ok" for i in range(len(CASES))], done.stdout + done.stderr[-3000:]


@pytest.mark.parametrize("chunks", [1, 2, 3, 5, 90])
def test_every_layout_takes_the_kernel_variant_compiled_at_warm_up(chunks: int) -> None:
    # Triton specialises on each pointer's 16-byte alignment and each integer's divisibility by 16: a layout
    # breaking either would compile a new kernel in the middle of serving.
    lengths = [7 + 13 * c for c in range(chunks)]
    starts = [0 if c % 2 else 3 * c for c in range(chunks)]
    pages = [list(range(1, 2 + (s + n) // PAGE)) for n, s in zip(lengths, starts, strict=True)]
    layout = PrefillLayout.build(lengths, starts, pages, PAGE, 16, torch.device("cpu"))
    for tensor in (layout.chunks, layout.blocks, layout.table):
        assert tensor.data_ptr() % 16 == 0
    assert layout.table.stride(0) % 16 == 0
    assert layout.chunks[:, :3].tolist() == [[sum(lengths[:c]), lengths[c], starts[c]] for c in range(chunks)]


def test_a_chunk_past_its_pages_is_refused() -> None:
    with pytest.raises(ValueError, match="owns 1 pages"):
        PrefillLayout.build([10], [10], [[3]], PAGE, 16, torch.device("cpu"))


if __name__ == "__main__":
    for index, case in enumerate(CASES):
        print(f"case {index}: {_run_case(*case)}", flush=True)
