"""The fast prefill's attention groups (decoder.prefill_plans / attend_plans): the GPU path's attention, checked on
the CPU against each prompt's own causal SDPA (the Triton parts of the fast path are not involved)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asr_server.engine.continuous.decoder import attend_plans, prefill_plans

HEADS, KV_HEADS, DIM = 4, 2, 8


def _packed(lengths: list[int], seed: int) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    q = torch.randn(total, HEADS, DIM, generator=gen)
    k = torch.randn(total, KV_HEADS, DIM, generator=gen)
    v = torch.randn(total, KV_HEADS, DIM, generator=gen)
    return bounds, q, k, v


def _alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, begin: int, end: int) -> torch.Tensor:
    rep = HEADS // KV_HEADS
    qi = q[begin:end].transpose(0, 1)[None]
    ki = k[begin:end].transpose(0, 1)[None].repeat_interleave(rep, dim=1)
    vi = v[begin:end].transpose(0, 1)[None].repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=DIM**-0.5)[0].transpose(0, 1)


@pytest.mark.parametrize(
    ("lengths", "plans_expected", "masked_expected"),
    [
        ([5, 5, 5], 1, 0),  # one length: one causal SDPA, no mask (the flash kernel)
        ([7], 1, 0),  # a lone prompt: no mask either
        ([5, 3, 5, 7, 2, 5, 7], 3, 1),  # two equal-length groups and the rest padded together
        ([6, 1, 9], 1, 1),  # all different: one masked SDPA
        ([4, 4, 9], 2, 0),  # a group and a lone prompt, which then needs no mask
    ],
)
def test_every_prompt_attends_causally_within_itself_only(
    lengths: list[int], plans_expected: int, masked_expected: int
) -> None:
    bounds, q, k, v = _packed(lengths, seed=len(lengths))
    plans = prefill_plans(lengths, [0] * len(lengths), bounds, torch.device("cpu"))
    assert len(plans) == plans_expected
    assert sum(p.mask is not None for p in plans) == masked_expected
    out = torch.full_like(q, float("nan"))
    attend_plans(plans, q, k, v, out, scale=DIM**-0.5)
    for i, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        torch.testing.assert_close(out[begin:end], _alone(q, k, v, begin, end), msg=f"prompt {i}")


def test_padding_cannot_carry_another_prompts_nan_and_continued_chunks_are_left_out() -> None:
    # Prompt 0 holds the token the padding gathers; its K/V made NaN must reach no other prompt. Prompt 3 continues
    # a prompt in its pages (start > 0): not planned here (the prefix attention writes its rows).
    lengths = [3, 6, 2, 4]
    offsets = [0, 0, 0, 16]
    bounds, q, k, v = _packed(lengths, seed=3)
    k[0] = float("nan")
    v[0] = float("nan")
    plans = prefill_plans(lengths, offsets, bounds, torch.device("cpu"))
    out = torch.full_like(q, float("nan"))
    attend_plans(plans, q, k, v, out, scale=DIM**-0.5)
    planned = torch.cat([p.dest for p in plans]).sort().values
    assert planned.tolist() == list(range(bounds[3]))
    for i in (1, 2):
        torch.testing.assert_close(out[bounds[i] : bounds[i + 1]], _alone(q, k, v, bounds[i], bounds[i + 1]))
    assert torch.isnan(out[bounds[3] :]).all()  # untouched
