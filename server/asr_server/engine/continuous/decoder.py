"""The Qwen3 text decoder of a loaded Qwen3-ASR model, driven over a paged KV cache.

The weights and small modules (embedding, RMSNorms, projections, MLP, lm_head) are the checkpoint's own; only
the attention and cache path is ours, so each request reads its own cache and nothing else. The arithmetic follows
transformers' Qwen3 (q/k RMSNorm per head before RoPE, RoPE cos/sin computed in fp32 and cast to the model dtype,
GQA by repeating KV heads) so that fp32 results equal `model.generate`'s to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from asr_server.engine.continuous.attention import (
    PrefillLayout,
    paged_decode_attention_torch,
    paged_decode_attention_triton,
    paged_prefill_attention_torch,
    paged_prefill_attention_triton,
    prefill_block_m,
)


@dataclass
class KvCache:
    """One K and one V tensor per layer, each (num_pages, kv_heads, page_size, head_dim). Page 0 is scratch.

    The layers' tensors are views of one (layers, num_pages, ...) tensor each for K and V (`all_keys`,
    `all_values`), so copying a request's pages across every layer is one indexed copy, not one per layer."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    page_size: int
    all_keys: torch.Tensor
    all_values: torch.Tensor

    @property
    def num_pages(self) -> int:
        return int(self.keys[0].shape[0])


@dataclass
class DecodeBuffers:
    """The decode step's inputs and outputs, as fixed tensors a CUDA graph can replay over.

    Rows are request slots. The step feeds tokens[r] at positions[r], writes its K/V there, and leaves the next
    token in tokens[r] and positions[r] + 1 in positions[r]: the graph advances itself, and the host only writes
    rows whose request changed.
    """

    tokens: torch.Tensor  # (R,) int64
    positions: torch.Tensor  # (R,) int64
    block_table: torch.Tensor  # (R, P) int32
    active: torch.Tensor  # (R,) bool
    suppress_eos: torch.Tensor  # (R,) bool
    out_tokens: torch.Tensor  # (R,) int64: a copy of the step's tokens for the host to read
    # (R,) float32: each token's log-probability under the model, computed in the same step (result confidence).
    out_logprobs: torch.Tensor


class PagedDecoder:
    def __init__(
        self, model: Any, *, use_triton: bool, fuse_projections: bool, kv_dtype: torch.dtype | None = None
    ) -> None:
        text = model.model.language_model
        self._text = text
        self._lm_head = model.lm_head
        self._layers = list(text.layers)
        config = text.config
        self.num_layers = len(self._layers)
        self.hidden = int(config.hidden_size)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden // self.heads)
        self.vocab = int(config.vocab_size)
        attn0 = self._layers[0].self_attn
        self.scale = float(attn0.scaling)
        self.inv_freq: torch.Tensor = text.rotary_emb.inv_freq
        self.rope_scaling = float(getattr(text.rotary_emb, "attention_scaling", 1.0))
        param = next(model.parameters())
        self.dtype: torch.dtype = param.dtype
        self.device: torch.device = param.device
        # fp8 (e4m3, unscaled) halves the bytes every decode step reads; only the Triton path reads it.
        self.kv_dtype: torch.dtype = kv_dtype or self.dtype
        if self.kv_dtype != self.dtype and not use_triton:
            raise ValueError("a KV cache dtype other than the model's needs the Triton kernels (CUDA)")
        self.use_triton = use_triton
        self.splits_by_batch: dict[int, int] = {}
        self.eos_ids = torch.zeros(0, dtype=torch.long, device=self.device)
        # Fused QKV and gate/up weights: one GEMM instead of three (two) per layer at decode time.
        self._qkv: list[torch.Tensor] | None = None
        self._gate_up: list[torch.Tensor] | None = None
        if fuse_projections:
            self._qkv = []
            self._gate_up = []
            for layer in self._layers:
                a = layer.self_attn
                self._qkv.append(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], dim=0).detach())
                m = layer.mlp
                self._gate_up.append(torch.cat([m.gate_proj.weight, m.up_proj.weight], dim=0).detach())
        self._has_bias = getattr(attn0.q_proj, "bias", None) is not None
        # CUDA: fused Triton kernels for the elementwise work (kernels.py says why).
        self._fast = use_triton and self._qkv is not None and not self._has_bias
        self._eps = float(self._layers[0].input_layernorm.variance_epsilon)
        self._inv_freq32 = self.inv_freq.to(device=self.device, dtype=torch.float32).contiguous()

    # ---- cache ----

    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.kv_dtype).bits // 8

    def allocate_cache(self, num_pages: int, page_size: int) -> KvCache:
        shape = (self.num_layers, num_pages, self.kv_heads, page_size, self.head_dim)
        all_keys = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        all_values = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        return KvCache(list(all_keys.unbind(0)), list(all_values.unbind(0)), page_size, all_keys, all_values)

    # ---- shared pieces ----

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq.to(device=positions.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(self.dtype)
        sin = (emb.sin() * self.rope_scaling).to(self.dtype)
        return cos[:, None, :], sin[:, None, :]

    @staticmethod
    def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos) + (rotated * sin)

    def _qkv_proj(self, index: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self._layers[index].self_attn
        n = h.shape[0]
        if self._qkv is not None and not self._has_bias:
            fused = h @ self._qkv[index].t()
            q_size = self.heads * self.head_dim
            kv_size = self.kv_heads * self.head_dim
            q, k, v = torch.split(fused, [q_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = attn.q_norm(q.reshape(n, self.heads, self.head_dim))
        k = attn.k_norm(k.reshape(n, self.kv_heads, self.head_dim))
        return q, k, v.reshape(n, self.kv_heads, self.head_dim)

    def _mlp(self, index: int, h: torch.Tensor) -> torch.Tensor:
        mlp = self._layers[index].mlp
        if self._gate_up is not None:
            gate, up = (h @ self._gate_up[index].t()).chunk(2, dim=-1)
            down: torch.Tensor = mlp.down_proj(mlp.act_fn(gate) * up)
            return down
        out: torch.Tensor = mlp(h)
        return out

    def _logits_to_tokens(self, hidden: torch.Tensor, suppress_eos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._sample(self._lm_head(self._text.norm(hidden)), suppress_eos)

    def _sample(self, logits: torch.Tensor, suppress_eos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The greedy token of each row and its log-probability: log-softmax of the model's logits at the chosen
        token (one logsumexp over the vocabulary in float32, inside the step and its CUDA graph: no second pass).
        Benchmark rows never end on EOS (like generate's min_new_tokens): their EOS logits become -inf for the
        choice only; the probability is the model's own."""
        raw = logits
        if self.eos_ids.numel() > 0:
            eos_logits = logits[:, self.eos_ids]
            blocked = torch.where(suppress_eos[:, None], torch.full_like(eos_logits, float("-inf")), eos_logits)
            logits = logits.index_copy(1, self.eos_ids, blocked)
        tokens = torch.argmax(logits, dim=-1)
        chosen = raw.gather(1, tokens[:, None])[:, 0].float()
        return tokens, chosen - torch.logsumexp(raw.float(), dim=-1)

    def _forward_fast(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        slot_page: torch.Tensor,
        slot_offset: torch.Tensor,
        cache: KvCache,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """All layers with the fused kernels; returns the final-normalised hidden states (T, hidden)."""
        from asr_server.engine.continuous import kernels

        if self._qkv is None or self._gate_up is None:
            raise RuntimeError("the fused path needs fused projection weights")
        eps = self._eps
        q_size = self.heads * self.head_dim
        kv_size = self.kv_heads * self.head_dim
        h, residual = kernels.add_rms_norm(x, None, self._layers[0].input_layernorm.weight, eps)
        for index, layer in enumerate(self._layers):
            attn_mod = layer.self_attn
            qkv = h @ self._qkv[index].t()
            q, k = kernels.qk_norm_rope_write(
                qkv,
                positions,
                self._inv_freq32,
                self.rope_scaling,
                attn_mod.q_norm.weight,
                attn_mod.k_norm.weight,
                float(attn_mod.q_norm.variance_epsilon),
                cache.keys[index],
                cache.values[index],
                slot_page,
                slot_offset,
                self.heads,
                self.kv_heads,
                self.head_dim,
            )
            v = qkv[:, q_size + kv_size :].reshape(-1, self.kv_heads, self.head_dim)
            attn = attend(index, q, k, v).reshape(-1, q_size)
            h, residual = kernels.add_rms_norm(
                attn_mod.o_proj(attn), residual, layer.post_attention_layernorm.weight, eps
            )
            mlp = layer.mlp
            down = mlp.down_proj(kernels.silu_mul(h @ self._gate_up[index].t()))
            last = index + 1 == self.num_layers
            next_norm = self._text.norm if last else self._layers[index + 1].input_layernorm
            h, residual = kernels.add_rms_norm(down, residual, next_norm.weight, eps)
        return h

    def _tokens_from_normed(
        self, hidden: torch.Tensor, suppress_eos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._sample(self._lm_head(hidden), suppress_eos)

    # ---- prefill ----

    def prefill(
        self,
        inputs_embeds: torch.Tensor,
        lengths: list[int],
        slots_page: torch.Tensor,
        slots_offset: torch.Tensor,
        cache: KvCache,
        suppress_eos: torch.Tensor,
        starts: list[int],
        pages: Sequence[Sequence[int]],
        sample_rows: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs prompt chunks of several requests packed end to end ((T, hidden), T = sum(lengths)): request i's
        tokens at positions starts[i]..starts[i] + lengths[i] - 1, writes their K/V at (slots_page[t],
        slots_offset[t]), and returns the token after each chunk (n,) (the first generated token when the chunk
        ends the prompt) with its log-probability (n,) float32. A chunk that starts past 0 attends to its earlier
        chunks (or reused prefix) through its pages (`pages[i]`, host page ids; the fast path reads every chunk's
        keys there). With `sample_rows` (packed token indices; `suppress_eos` then one flag per entry), the greedy
        token after each of those tokens instead (a draft's verification needs the one after every draft token)."""
        total = inputs_embeds.shape[0]
        # Built on the host and copied once: one small arange per chunk on the device is a launch per chunk.
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)]).to(
            inputs_embeds.device, non_blocking=True
        )
        x = inputs_embeds
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        rep = self.heads // self.kv_heads
        rows = sample_rows if sample_rows is not None else [b - 1 for b in bounds[1:]]
        last = torch.tensor(rows, dtype=torch.long).to(x.device, non_blocking=True)
        if self._fast:
            # One launch per layer for every chunk, whatever its length or prefix: a prefill of ~90 live-stream
            # prompts of many lengths was otherwise a few dozen small SDPA groups per layer, and the engine
            # process's Python time to launch them, not the GPU, bounded how many streams it served.
            layout = PrefillLayout.build(lengths, starts, pages, cache.page_size, prefill_block_m(rep), x.device)

            def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return paged_prefill_attention_triton(q, cache.keys[index], cache.values[index], layout, self.scale)

            hidden = self._forward_fast(x, positions, slots_page, slots_offset, cache, attend)
            return self._tokens_from_normed(hidden[last], suppress_eos)
        cos, sin = self._rope(positions)
        for index, layer in enumerate(self._layers):
            h = layer.input_layernorm(x)
            q, k, v = self._qkv_proj(index, h)
            q = self._apply_rope(q, cos, sin)
            k = self._apply_rope(k, cos, sin)
            cache.keys[index][slots_page, :, slots_offset] = k
            cache.values[index][slots_page, :, slots_offset] = v
            outs = []
            for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                if starts[i] > 0:
                    outs.append(
                        paged_prefill_attention_torch(
                            q[start:end],
                            cache.keys[index],
                            cache.values[index],
                            [end - start],
                            [starts[i]],
                            [pages[i]],
                            self.scale,
                        )
                    )
                    continue
                # (1, heads, L, D): causal attention inside this request only.
                qi = q[start:end].transpose(0, 1)[None]
                ki = k[start:end].transpose(0, 1)[None]
                vi = v[start:end].transpose(0, 1)[None]
                if rep > 1:
                    ki = ki.repeat_interleave(rep, dim=1)
                    vi = vi.repeat_interleave(rep, dim=1)
                o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=self.scale)
                outs.append(o[0].transpose(0, 1))
            attn = torch.cat(outs, dim=0).reshape(total, self.heads * self.head_dim)
            x = x + layer.self_attn.o_proj(attn)
            x = x + self._mlp(index, layer.post_attention_layernorm(x))
        return self._logits_to_tokens(x[last], suppress_eos)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedded: torch.Tensor = self._text.embed_tokens(input_ids)
        return embedded

    # ---- decode ----

    def decode_step(self, buffers: DecodeBuffers, cache: KvCache, rows: int, max_pages: int) -> None:
        """One greedy token for rows 0..rows-1, in place on `buffers` (capturable: no host syncs)."""
        tokens = buffers.tokens[:rows]
        positions = buffers.positions[:rows]
        table = buffers.block_table[:rows]
        active = buffers.active[:rows]
        page = cache.page_size
        width = table.shape[1]
        page_index = torch.clamp(positions // page, max=width - 1)
        slot_page = table.gather(1, page_index[:, None])[:, 0].long()
        slot_offset = positions % page
        # Rows without a request attend to one token of the scratch page: finite, never read back.
        seq_lens = torch.where(active, positions + 1, torch.ones_like(positions)).to(torch.int32)
        x = self.embed(tokens)
        splits = self.splits_by_batch.get(rows, 1)
        if self._fast:

            def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return paged_decode_attention_triton(
                    q, cache.keys[index], cache.values[index], table, seq_lens, self.scale, splits
                )

            hidden = self._forward_fast(x, positions, slot_page, slot_offset, cache, attend)
            next_fast, logprobs = self._tokens_from_normed(hidden, buffers.suppress_eos[:rows])
            tokens.copy_(next_fast)
            buffers.out_tokens[:rows].copy_(next_fast)
            buffers.out_logprobs[:rows].copy_(logprobs)
            positions.add_(1)
            return
        cos, sin = self._rope(positions)
        for index, layer in enumerate(self._layers):
            h = layer.input_layernorm(x)
            q, k, v = self._qkv_proj(index, h)
            q = self._apply_rope(q, cos, sin)
            k = self._apply_rope(k, cos, sin)
            cache.keys[index][slot_page, :, slot_offset] = k
            cache.values[index][slot_page, :, slot_offset] = v
            if self.use_triton:
                attn = paged_decode_attention_triton(
                    q, cache.keys[index], cache.values[index], table, seq_lens, self.scale, splits
                )
            else:
                attn = paged_decode_attention_torch(
                    q, cache.keys[index], cache.values[index], table, seq_lens, self.scale, max_pages
                )
            x = x + layer.self_attn.o_proj(attn.reshape(rows, self.heads * self.head_dim))
            x = x + self._mlp(index, layer.post_attention_layernorm(x))
        next_tokens, logprobs = self._logits_to_tokens(x, buffers.suppress_eos[:rows])
        tokens.copy_(next_tokens)
        buffers.out_tokens[:rows].copy_(next_tokens)
        buffers.out_logprobs[:rows].copy_(logprobs)
        positions.add_(1)
