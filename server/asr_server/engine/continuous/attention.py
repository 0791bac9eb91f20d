"""Decode attention over a paged KV cache.

Cache layout per layer: K and V of shape (num_pages, kv_heads, page_size, head_dim). A request owns the pages in
its row of the block table; its tokens 0..seq_len-1 sit at page block_table[row, t // page_size], offset
t % page_size. Page 0 is a scratch page that rows without a request point at, so a graph replay over a bucket
with holes writes and reads only memory nobody owns.

Two implementations of the same function:
- `paged_decode_attention_torch`: gathers each row's pages and runs SDPA with a length mask. Reads up to the
  longest row's pages; used on CPU and as the reference in the GPU tests.
- `paged_decode_attention_triton`: a split-KV (flash-decoding) kernel that reads only each row's own pages.
  Splits interleave pages (split s reads pages s, s+S, ...), so every split has work whatever the length and a
  batch of one still fills the GPU.
"""

from __future__ import annotations

from typing import Any

import torch


def paged_decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_pages: int,
) -> torch.Tensor:
    """q: (B, H, D); returns (B, H, D). `max_pages` bounds the pages read per row (host-known)."""
    batch, heads, dim = q.shape
    kv_heads, page = k_cache.shape[1], k_cache.shape[2]
    pages = block_table[:, :max_pages].long()
    # (B, P, KVH, page, D) -> (B, KVH, P * page, D)
    keys = k_cache[pages].permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, max_pages * page, dim)
    values = v_cache[pages].permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, max_pages * page, dim)
    positions = torch.arange(max_pages * page, device=q.device)
    mask = (positions[None, :] < seq_lens[:, None].to(positions.dtype))[:, None, None, :]
    # Slots past a row's length hold whatever the page's last owner left, NaN included; a masked score times a
    # NaN value is still NaN (0 x NaN), and SDPA adds its mask to the scores (NaN + -inf is NaN). Zeroed, they
    # cannot reach the output.
    slot_ok = mask[:, :, 0, :, None]
    keys = torch.where(slot_ok, keys, 0.0)
    values = torch.where(slot_ok, values, 0.0)
    rep = heads // kv_heads
    if rep > 1:
        keys = keys.repeat_interleave(rep, dim=1)
        values = values.repeat_interleave(rep, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask, scale=scale)
    return out[:, :, 0, :]


def num_splits_for(batch: int, kv_heads: int, sm_count: int) -> int:
    """Enough splits for about two programs per SM; one when the batch alone fills the GPU."""
    wanted = -(-2 * sm_count // max(1, batch * kv_heads))
    return max(1, min(32, wanted))


_KERNEL: Any = None


def _kernel() -> Any:
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator,unused-ignore]
    def paged_decode_kernel(  # type: ignore[no-untyped-def]
        q_ptr,
        k_ptr,
        v_ptr,
        table_ptr,
        lens_ptr,
        acc_ptr,
        ml_ptr,
        scale,
        table_stride,
        stride_kp,
        stride_kh,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        PAGE: tl.constexpr,
        SPLITS: tl.constexpr,
        KV_HEADS: tl.constexpr,
    ):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        heads = KV_HEADS * GROUP
        seq_len = tl.load(lens_ptr + row)
        n_pages = (seq_len + PAGE - 1) // PAGE

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        t = tl.arange(0, PAGE)
        g_ok = g < GROUP
        head = kvh * GROUP + g
        q = tl.load(q_ptr + (row * heads + head)[:, None] * HEAD_DIM + d[None, :], mask=g_ok[:, None], other=0.0)

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        n_iter = (n_pages - split + SPLITS - 1) // SPLITS
        for i in range(0, n_iter):
            p = split + i * SPLITS
            page_id = tl.load(table_ptr + row * table_stride + p).to(tl.int64)
            base = page_id * stride_kp + kvh * stride_kh
            offs = base + t[:, None] * HEAD_DIM + d[None, :]
            tok_ok = (p * PAGE + t) < seq_len
            # Slots past seq_len hold what the page's last owner left (NaN included): never loaded, so a zero
            # softmax weight never meets a NaN value (0 x NaN is NaN).
            k = tl.load(k_ptr + offs, mask=tok_ok[:, None], other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(tok_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            probs = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(probs, 1)
            v = tl.load(v_ptr + offs, mask=tok_ok[:, None], other=0.0).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v)
            m_i = m_new

        out_row = (row * heads + head) * SPLITS + split
        tl.store(acc_ptr + out_row[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None])
        tl.store(ml_ptr + out_row * 2, m_i, mask=g_ok)
        tl.store(ml_ptr + out_row * 2 + 1, l_i, mask=g_ok)

    _KERNEL = paged_decode_kernel
    return _KERNEL


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    splits: int,
) -> torch.Tensor:
    """Same contract as the torch version, reading only each row's own pages. Rows need seq_len >= 1."""
    batch, heads, dim = q.shape
    kv_heads, page = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    group_pad = max(16, 1 << (group - 1).bit_length())
    acc = torch.empty((batch, heads, splits, dim), device=q.device, dtype=torch.float32)
    ml = torch.empty((batch, heads, splits, 2), device=q.device, dtype=torch.float32)
    _kernel()[(batch, kv_heads, splits)](
        q.contiguous(),
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        acc,
        ml,
        scale,
        block_table.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=dim,
        PAGE=page,
        SPLITS=splits,
        KV_HEADS=kv_heads,
    )
    from asr_server.engine.continuous.kernels import combine_splits

    return combine_splits(acc, ml, q.dtype)
