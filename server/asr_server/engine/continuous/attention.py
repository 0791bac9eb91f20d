"""Decode and prefill attention over a paged KV cache.

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

Prefill: `paged_prefill_attention_triton` runs every chunk of a packed prefill in one launch per layer (programs
over (chunk, block of query tokens) x KV head), keys read from each chunk's pages; `paged_prefill_attention_torch`
is its reference, one SDPA per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


_KERNELS: dict[str, Any] = {}


def _build() -> dict[str, Any]:
    """Both kernels, defined on first use: importing this module must not import Triton (CPU hosts)."""
    if _KERNELS:
        return _KERNELS
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

    @triton.jit  # type: ignore[untyped-decorator,unused-ignore]
    def paged_prefill_kernel(  # type: ignore[no-untyped-def]
        q_ptr,
        k_ptr,
        v_ptr,
        out_ptr,
        chunks_ptr,
        blocks_ptr,
        table_ptr,
        scale,
        table_stride,
        stride_kp,
        stride_kh,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        KV_HEADS: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        chunk = tl.load(blocks_ptr + b * 4)
        m0 = tl.load(blocks_ptr + b * 4 + 1)
        begin = tl.load(chunks_ptr + chunk * 4)
        n = tl.load(chunks_ptr + chunk * 4 + 1)
        start = tl.load(chunks_ptr + chunk * 4 + 2)
        heads = KV_HEADS * GROUP

        # Row r: query token m0 + r // GROUP_PAD, head kvh * GROUP + r % GROUP_PAD (the GQA group shares keys).
        r = tl.arange(0, BLOCK_M * GROUP_PAD)
        tok = m0 + r // GROUP_PAD
        g = r % GROUP_PAD
        row_ok = (tok < n) & (g < GROUP)
        d = tl.arange(0, HEAD_DIM)
        q_offs = ((begin + tok) * heads + kvh * GROUP + g)[:, None] * HEAD_DIM + d[None, :]
        q = tl.load(q_ptr + q_offs, mask=row_ok[:, None], other=0.0)
        # Padding rows take the last real query's position, so every row sees at least one key (no 0/0).
        q_pos = start + tl.minimum(tok, n - 1)
        context = start + tl.minimum(m0 + BLOCK_M, n)
        n_pages = (context + PAGE - 1) // PAGE

        t = tl.arange(0, PAGE)
        m_i = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
        acc = tl.zeros([BLOCK_M * GROUP_PAD, HEAD_DIM], tl.float32)
        for p in range(0, n_pages):
            page_id = tl.load(table_ptr + chunk * table_stride + p).to(tl.int64)
            offs = page_id * stride_kp + kvh * stride_kh + t[:, None] * HEAD_DIM + d[None, :]
            key_pos = p * PAGE + t
            # Slots at or past the context were not written by this request (the page's last owner left them,
            # NaN included): never loaded, so a zero softmax weight never meets a NaN value.
            key_ok = key_pos < context
            k = tl.load(k_ptr + offs, mask=key_ok[:, None], other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(key_pos[None, :] <= q_pos[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            probs = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(probs, 1)
            v = tl.load(v_ptr + offs, mask=key_ok[:, None], other=0.0).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    _KERNELS.update(decode=paged_decode_kernel, prefill=paged_prefill_kernel)
    return _KERNELS


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
    _build()["decode"][(batch, kv_heads, splits)](
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


# ---- prefill ----


@dataclass(frozen=True)
class PrefillLayout:
    """Where every chunk of a packed prefill sits, for `paged_prefill_attention_triton`: built once per prefill on
    the host and copied to the device in one go, then shared by every layer. Chunk c's queries are packed rows
    q_begin[c]..q_begin[c] + q_len[c] - 1 at positions q_start[c]..; its keys are positions 0..q_start[c] + q_len[c]
    - 1 in its pages (table[c]); program b runs the block_m query rows from blocks[b][1] on of chunk blocks[b][0]."""

    chunks: torch.Tensor  # (C, 4) int32: q_begin, q_len, q_start, 0
    table: torch.Tensor  # (C, P) int32: page ids (padding: the scratch page 0, never read); P a multiple of 16
    blocks: torch.Tensor  # (NB, 4) int32: chunk, first row within it, 0, 0
    block_m: int

    @staticmethod
    def build(
        lengths: list[int],
        starts: list[int],
        pages: Sequence[Sequence[int]],
        page_size: int,
        block_m: int,
        device: torch.device,
    ) -> PrefillLayout:
        chunks: list[tuple[int, int, int, int]] = []
        blocks: list[tuple[int, int, int, int]] = []
        widths: list[int] = []
        begin = 0
        for c, (n, start, owned) in enumerate(zip(lengths, starts, pages, strict=True)):
            width = -(-(start + n) // page_size)
            if len(owned) < width:
                raise ValueError(f"chunk {c} reaches position {start + n - 1} but owns {len(owned)} pages")
            chunks.append((begin, n, start, 0))
            blocks.extend((c, m0, 0, 0) for m0 in range(0, n, block_m))
            widths.append(width)
            begin += n
        # Triton compiles a kernel anew for each pattern of its integer arguments' divisibility by 16 and its
        # pointers' 16-byte alignment: rows of 16 bytes and a table width that is a multiple of 16 keep every
        # prefill on the variant compiled at warm-up (a compile mid-run stalls the prefill thread for ~1 s).
        table_width = -(-max(widths, default=1) // 16) * 16
        table = [
            p
            for width, owned in zip(widths, pages, strict=True)
            for p in (*owned[:width], *[0] * (table_width - width))
        ]
        # One pinned buffer and one copy for the three, not three copies.
        host = torch.tensor(
            [v for row in chunks for v in row] + [v for row in blocks for v in row] + table, dtype=torch.int32
        )
        if device.type == "cuda":
            host = host.pin_memory()
        flat = host.to(device, non_blocking=True)
        n_chunks, n_blocks = len(chunks), len(blocks)
        return PrefillLayout(
            chunks=flat[: 4 * n_chunks].view(n_chunks, 4),
            blocks=flat[4 * n_chunks : 4 * (n_chunks + n_blocks)].view(n_blocks, 4),
            table=flat[4 * (n_chunks + n_blocks) :].view(len(lengths), table_width),
            block_m=block_m,
        )


def prefill_block_m(group: int) -> int:
    """Query tokens per program: 128 query rows (tokens x the padded GQA group), at least 16 tokens."""
    return max(16, 128 // _pow2(group))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def paged_prefill_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: list[int],
    starts: list[int],
    pages: Sequence[Sequence[int]],
    scale: float,
) -> torch.Tensor:
    """The reference: each chunk's causal attention over its pages, one SDPA per chunk. q (T, heads, D) packed;
    returns (T, heads, D)."""
    heads, dim = int(q.shape[1]), int(q.shape[2])
    kv_heads, page = int(k_cache.shape[1]), int(k_cache.shape[2])
    rep = heads // kv_heads
    outs = []
    begin = 0
    for n, start, owned in zip(lengths, starts, pages, strict=True):
        context = start + n
        used = torch.tensor(owned[: -(-context // page)], dtype=torch.long, device=q.device)
        keys = k_cache[used].permute(1, 0, 2, 3).reshape(kv_heads, -1, dim)[:, :context].to(q.dtype)
        values = v_cache[used].permute(1, 0, 2, 3).reshape(kv_heads, -1, dim)[:, :context].to(q.dtype)
        if rep > 1:
            keys = keys.repeat_interleave(rep, dim=0)
            values = values.repeat_interleave(rep, dim=0)
        rows = torch.arange(n, device=q.device)[:, None] + start
        mask = torch.arange(context, device=q.device)[None, :] <= rows
        qi = q[begin : begin + n].transpose(0, 1)[None]
        out = torch.nn.functional.scaled_dot_product_attention(
            qi, keys[None], values[None], attn_mask=mask, scale=scale
        )
        outs.append(out[0].transpose(0, 1))
        begin += n
    return torch.cat(outs, dim=0)


def paged_prefill_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: PrefillLayout, scale: float
) -> torch.Tensor:
    """Every chunk of a packed prefill in one launch: each query attends causally to its own request's keys, read
    from its pages (the chunk's own K/V are written there first), whether or not the chunk follows a reused prefix
    or earlier chunks. Same result as `paged_prefill_attention_torch`."""
    total, heads, dim = q.shape
    kv_heads, page = int(k_cache.shape[1]), int(k_cache.shape[2])
    group = heads // kv_heads
    out = torch.empty_like(q)
    _build()["prefill"][(int(layout.blocks.shape[0]), kv_heads)](
        q.contiguous(),
        k_cache,
        v_cache,
        out,
        layout.chunks,
        layout.blocks,
        layout.table,
        scale,
        layout.table.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        GROUP=group,
        GROUP_PAD=_pow2(group),
        HEAD_DIM=dim,
        PAGE=page,
        BLOCK_M=layout.block_m,
        KV_HEADS=kv_heads,
        # 128 query rows x 128 dims of fp32 accumulator: eight warps keep it in registers.
        num_warps=8,
    )
    return out
