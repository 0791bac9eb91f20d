"""The audio encoder over a micro-batch of clips, with all attention windows in one SDPA call per layer.

transformers' encoder (without flash-attention, which the GPU machine lacks) splits the packed sequence into its
8 s windows and runs one SDPA per window in a Python loop: a 120 s clip is 15 windows, a micro-batch of 8 is 120
SDPA calls per layer, 2,880 per micro-batch, and the encoder ran at ~4,600 audio-s/s on an H100 (1.7B) where its
arithmetic allows far more. Here the windows are padded to the longest (104 positions) and attended in one call
with a key mask; the convolutions, projections, norms and weights are the checkpoint's own modules, in the same
order, so the output equals transformers' to rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def encode(audio_tower: Any, features: torch.Tensor, features_mask: torch.Tensor) -> torch.Tensor:
    """features (B, mel, frames), frames a multiple of 2 * n_window, zero-padded per clip; returns the encoder's
    packed output (sum of each clip's audio tokens, d_model), clips in order, as `audio_tower(...)` does."""
    from transformers.models.qwen3_asr.modeling_qwen3_asr import get_audio_cu_seqlens

    tower = audio_tower
    batch, mel_bins, frames = features.shape
    chunk_len = tower.n_window * 2
    if frames % chunk_len != 0:
        raise ValueError(f"feature frames ({frames}) must be a multiple of {chunk_len}")
    num_chunks = frames // chunk_len
    # Every index below is integer arithmetic on the mask, done on the host and sent over once: on the device each
    # `.item()`, boolean index, `nonzero` and transformers' per-clip loop in get_audio_cu_seqlens waited for the
    # convolutions (a host sync per clip), stalling the prefill thread while it could be launching the decoder.
    dev = features.device
    mask = features_mask.to("cpu")
    feature_lens = mask.sum(-1).to(torch.long)
    chunk_lengths = mask.view(batch, num_chunks, chunk_len).sum(dim=-1).reshape(-1).to(torch.long)
    cu_seqlens = get_audio_cu_seqlens(chunk_lengths, feature_lens, tower.n_window_infer, tower.n_window)

    chunked = (
        features.view(batch, mel_bins, num_chunks, chunk_len)
        .permute(0, 2, 1, 3)
        .reshape(batch * num_chunks, 1, mel_bins, chunk_len)
    )
    conv = F.gelu(tower.conv2d1(chunked))
    conv = F.gelu(tower.conv2d2(conv))
    conv = F.gelu(tower.conv2d3(conv))
    total_chunks, channels, freq_bins, time_steps = conv.size()
    conv = tower.conv_out(conv.permute(0, 3, 1, 2).contiguous().view(total_chunks, time_steps, channels * freq_bins))
    conv = conv + tower.positional_embedding.positional_embedding[:time_steps].to(conv.dtype)
    post_lens = chunk_lengths
    for _ in range(3):
        post_lens = torch.where(post_lens > 0, (post_lens - 1) // 2 + 1, torch.zeros_like(post_lens))
    valid = torch.arange(time_steps) < post_lens.unsqueeze(1)
    hidden = conv.reshape(-1, conv.shape[-1]).index_select(0, _to(valid.flatten().nonzero().squeeze(-1), dev))

    # Windows -> (W, L) gather index with a key mask.
    bounds = cu_seqlens.to(torch.long)
    lengths = bounds[1:] - bounds[:-1]
    longest = int(lengths.max())
    offsets = torch.arange(longest)
    inside = offsets[None, :] < lengths[:, None]
    gather = _to(torch.where(inside, bounds[:-1, None] + offsets[None, :], torch.zeros_like(offsets[None, :])), dev)
    # Full windows (all but each clip's last) share one length: one SDPA with no mask, which takes the flash
    # kernel; the partial ones, padded, one masked SDPA.
    full_host = (lengths == longest).nonzero().squeeze(-1)
    partial_host = (lengths != longest).nonzero().squeeze(-1)
    n_partial = int(partial_host.numel())
    key_mask = _to(inside.index_select(0, partial_host)[:, None, None, :], dev)
    inside_flat = _to(inside.flatten().nonzero().squeeze(-1), dev)
    full, partial = _to(full_host, dev), _to(partial_host, dev)

    for layer in tower.layers:
        residual = hidden
        h = layer.self_attn_layer_norm(hidden)
        attn = layer.self_attn
        heads = attn.num_heads
        head_dim = attn.head_dim
        n = h.shape[0]
        q = attn.q_proj(h).reshape(n, heads, head_dim)
        k = attn.k_proj(h).reshape(n, heads, head_dim)
        v = attn.v_proj(h).reshape(n, heads, head_dim)
        qw = q[gather].transpose(1, 2)  # (W, heads, L, D)
        kw = k[gather].transpose(1, 2)
        vw = v[gather].transpose(1, 2)
        out = torch.empty_like(qw)
        out.index_copy_(
            0,
            full,
            F.scaled_dot_product_attention(qw[full], kw[full], vw[full], scale=attn.scaling),
        )
        if n_partial:
            out.index_copy_(
                0,
                partial,
                F.scaled_dot_product_attention(
                    qw[partial], kw[partial], vw[partial], attn_mask=key_mask, scale=attn.scaling
                ),
            )
        out = out.transpose(1, 2).reshape(-1, heads * head_dim).index_select(0, inside_flat)
        hidden = residual + attn.out_proj(out)
        residual = hidden
        h = layer.final_layer_norm(hidden)
        h = layer.fc2(layer.activation_fn(layer.fc1(h)))
        hidden = residual + h
    result: torch.Tensor = tower.ln_post(hidden)
    return result


def _to(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-made index on the encoder's device. From pageable memory, as the engine's other small uploads: the
    driver stages a copy this small at once instead of waiting for the stream (to be confirmed by the next GPU
    profile; pinning would add a cudaHostAlloc per new size)."""
    return index if device.type == "cpu" else index.to(device, non_blocking=True)
