"""The continuous engine's model runner: it alone touches the device (as vLLM's GPU model runner).

It owns the paged decoder, the KV cache tensors, the decode step's static buffers and the CUDA graphs, and runs
what the scheduler planned: the audio encoder over admitted clips in micro-batches of at most
`encoder_batch_audio_s` seconds (a padded batch of 128 x 120 s needs 44 GB for one conv), the prompts' prefill
packed into their pages, and one greedy decode step for every row of a batch-size bucket (a CUDA graph replay per
bucket on GPU). Sampled tokens are copied to pinned memory asynchronously (`HostTokens`), so the host never waits
on the step it just launched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from asr_server.config import ContinuousConfig
from asr_server.engine.continuous.attention import num_splits_for
from asr_server.engine.continuous.decoder import DecodeBuffers, KvCache, PagedDecoder
from asr_server.engine.continuous.encoder import encode
from asr_server.engine.continuous.scheduler import PrefillWork
from asr_server.engine.generate_core import PreparedInputs
from asr_server.models.loading import LoadedAsrModel

logger = logging.getLogger(__name__)

_DEFAULT_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass
class HostTokens:
    """Tokens of one launched unit (a prefill or a decode step) on their way to the host."""

    event: torch.cuda.Event | None
    host: torch.Tensor

    def values(self) -> list[int]:
        """Waits for the copy; the tokens."""
        if self.event is not None:
            self.event.synchronize()
        values: list[int] = self.host.tolist()
        return values


@dataclass(frozen=True)
class PrefillInput:
    """One request's part of a prefill: what the scheduler planned, its prepared inputs, its EOS rule, and (a
    recompute after preemption) the tokens it had generated, prefilled after the prompt."""

    work: PrefillWork
    prepared: PreparedInputs
    suppress_eos: bool
    generated: tuple[int, ...] = ()

    @property
    def prompt_tokens(self) -> int:
        return int(self.prepared.input_ids.shape[1])


class ModelRunner:
    def __init__(self, loaded: LoadedAsrModel, config: ContinuousConfig) -> None:
        self._config = config
        model = loaded.model
        self._model = model
        self.device = torch.device(loaded.device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            # Triton launches and graph captures use the thread's current device: make it this replica's.
            torch.cuda.set_device(self.device)
        triton = config.kernels == "triton" or (config.kernels == "auto" and self.cuda)
        if config.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto or fp8, not {config.kv_cache_dtype!r}")
        kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else None
        self.decoder = PagedDecoder(model, use_triton=triton, fuse_projections=triton, kv_dtype=kv_dtype)
        mconfig = model.config
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = mconfig.eos_token_id
        self.eos_ids: tuple[int, ...] = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        self.decoder.eos_ids = torch.tensor(self.eos_ids, dtype=torch.long, device=self.device)
        self._audio_token_id = int(mconfig.audio_token_id)

        page = config.page_size
        self.table_width = -(-config.max_context_tokens // page)
        self.cache: KvCache = self.decoder.allocate_cache(self._size_cache(), page)
        self.rows = config.max_running
        dev = self.device
        self.buffers = DecodeBuffers(
            tokens=torch.zeros(self.rows, dtype=torch.long, device=dev),
            positions=torch.zeros(self.rows, dtype=torch.long, device=dev),
            block_table=torch.zeros((self.rows, self.table_width), dtype=torch.int32, device=dev),
            active=torch.zeros(self.rows, dtype=torch.bool, device=dev),
            suppress_eos=torch.zeros(self.rows, dtype=torch.bool, device=dev),
            out_tokens=torch.zeros(self.rows, dtype=torch.long, device=dev),
        )
        # Rows whose buffers hold a request (set when its prefill is in): they decode, and go inactive on release.
        self._live_rows: set[int] = set()
        self.buckets = [b for b in _DEFAULT_BUCKETS if b < self.rows] + [self.rows]
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            for b in self.buckets:
                self.decoder.splits_by_batch[b] = num_splits_for(b, self.decoder.kv_heads, props.multi_processor_count)
        self._graphs: dict[int, Any] = {}
        self.profile: dict[str, float] = {}
        self.decode_ms_by_bucket: dict[int, list[float]] = {}

    @property
    def num_pages(self) -> int:
        return self.cache.num_pages

    def kv_gib(self) -> float:
        return self.num_pages * self._config.page_size * self.decoder.kv_bytes_per_token() / 2**30

    def _size_cache(self) -> int:
        cfg = self._config
        per_token = self.decoder.kv_bytes_per_token()
        if cfg.kv_cache_tokens > 0:
            tokens = cfg.kv_cache_tokens
        elif self.cuda:
            free, _total = torch.cuda.mem_get_info(self.device)
            # Leave room for the encoder's micro-batches, the prefill activations and the graphs.
            reserve = 6 * 2**30
            tokens = int(max(0, free * cfg.kv_cache_memory_fraction - reserve) // per_token)
        else:
            tokens = cfg.max_running * 2048
        return max(2, tokens // cfg.page_size + 1)

    def close(self) -> None:
        self._graphs.clear()

    def _mark(self, name: str, since: float) -> float:
        """Profile mode: waits for the device, adds the time since `since` to `name`, returns now."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.profile[name] = self.profile.get(name, 0.0) + (now - since)
        return now

    # ---- rows ----

    def is_live(self, row: int) -> bool:
        return row in self._live_rows

    def num_live_rows(self) -> int:
        return len(self._live_rows)

    def release_row(self, row: int) -> None:
        """The row's request is gone: the row goes inactive and points at the scratch page."""
        if row not in self._live_rows:
            return
        self._live_rows.discard(row)
        index = torch.tensor([row], dtype=torch.long, device=self.device)
        b = self.buffers
        b.active.index_fill_(0, index, False)
        b.block_table.index_fill_(0, index, 0)

    def extend_pages(self, row: int, start: int, pages: Sequence[int]) -> None:
        """Pages appended to a live row's block table (lazy page growth), from column `start`."""
        if row not in self._live_rows or start + len(pages) > self.table_width:
            raise ValueError(f"cannot extend row {row} by {len(pages)} pages from {start}")
        values = torch.tensor(list(pages), dtype=torch.int32).to(self.device, non_blocking=True)
        self.buffers.block_table[row, start : start + len(pages)].copy_(values)

    def bucket(self, highest_row: int) -> int:
        """The decode batch size (a graph's bucket) that covers rows 0..highest_row."""
        return next(b for b in self.buckets if b > highest_row)

    def max_pages(self, longest_tokens: int) -> int:
        """Pages the torch attention reads per row for contexts up to `longest_tokens` (+1 page of slack)."""
        return min(self.table_width, -(-longest_tokens // self._config.page_size) + 1)

    # ---- encoder + prefill ----

    def prefill(self, inputs: Sequence[PrefillInput]) -> torch.Tensor:
        """Encodes the clips and prefills whole prompts into their pages; inserts their rows into the decode
        buffers; returns each request's first token (on the device).

        Changes no state the next call depends on before its last stage (the row inserts), so a failed call
        leaves nothing to undo: the pages are simply written again.
        """
        for item in inputs:
            if item.work.start_token != 0 or item.work.num_tokens != item.prompt_tokens + len(item.generated):
                raise ValueError("the model runner prefills whole prompts (and their generated tokens) only")
        prepared = [item.prepared for item in inputs]
        profiling = self._config.profile
        t0 = time.perf_counter()
        if profiling:
            t0 = self._mark("drain", t0)
        audio_embeds = self.encode(prepared)
        if profiling:
            t0 = self._mark("encoder", t0)
        decoder = self.decoder
        dev = self.device
        page = self._config.page_size
        pieces: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        for item in inputs:
            prompt = item.prepared.input_ids[0]
            # Only the prompt holds audio placeholders; a generated token of the same id is a token.
            pieces.append(prompt)
            masks.append(prompt == self._audio_token_id)
            if item.generated:
                pieces.append(torch.tensor(item.generated, dtype=prompt.dtype))
                masks.append(torch.zeros(len(item.generated), dtype=torch.bool))
        ids = torch.cat(pieces).to(dev)
        embeds = decoder.embed(ids)
        audio_mask = torch.cat(masks).to(dev)
        audio = torch.cat(audio_embeds).to(embeds.dtype)
        if int(audio.shape[0]) != int(audio_mask.sum().item()):
            raise RuntimeError(f"audio features ({audio.shape[0]}) and audio tokens do not match")
        embeds[audio_mask] = audio
        lengths = [item.work.num_tokens for item in inputs]
        slot_pages: list[int] = []
        slot_offsets: list[int] = []
        for item in inputs:
            for t in range(item.work.num_tokens):
                slot_pages.append(item.work.pages[t // page])
                slot_offsets.append(t % page)
        suppress = torch.tensor([item.suppress_eos for item in inputs], dtype=torch.bool, device=dev)
        first = decoder.prefill(
            embeds,
            lengths,
            torch.tensor(slot_pages, dtype=torch.long, device=dev),
            torch.tensor(slot_offsets, dtype=torch.long, device=dev),
            self.cache,
            suppress,
        )
        if profiling:
            self._mark("prefill", t0)
        self._insert_rows(inputs, first, lengths, suppress)
        return first

    def _insert_rows(
        self, inputs: Sequence[PrefillInput], first: torch.Tensor, lengths: list[int], suppress: torch.Tensor
    ) -> None:
        """The rows' first token, its position, the block table row and the flags."""
        dev = self.device
        rows = [item.work.row for item in inputs]
        index = torch.tensor(rows, dtype=torch.long, device=dev)
        table = torch.zeros((len(inputs), self.table_width), dtype=torch.int32)
        for i, item in enumerate(inputs):
            table[i, : len(item.work.pages)] = torch.tensor(item.work.pages, dtype=torch.int32)
        b = self.buffers
        b.tokens.index_copy_(0, index, first)
        b.positions.index_copy_(0, index, torch.tensor(lengths, dtype=torch.long, device=dev))
        b.block_table.index_copy_(0, index, table.to(dev, non_blocking=True))
        b.suppress_eos.index_copy_(0, index, suppress)
        b.active.index_fill_(0, index, True)
        self._live_rows.update(rows)

    def encode(self, prepared: list[PreparedInputs]) -> list[torch.Tensor]:
        """Audio embeddings per clip, in micro-batches bounded by audio seconds; clips sorted by length so a
        micro-batch pads little. Features are zero-padded per clip, as a single run's are."""
        from asr_server.engine.generate_core import collate

        model = self._model
        order = sorted(range(len(prepared)), key=lambda i: int(prepared[i].input_features.shape[2]))
        budget_frames = max(1, int(self._config.encoder_batch_audio_s * 100))
        results: list[torch.Tensor | None] = [None] * len(prepared)
        group: list[int] = []
        for i in order + [-1]:
            if i >= 0:
                frames = int(prepared[i].input_features.shape[2])
                if not group or (len(group) + 1) * frames <= budget_frames:
                    group.append(i)
                    continue
            if not group:
                break
            batch = collate([prepared[j] for j in group], pad_token_id=0)
            features = batch["input_features"].to(self.device, non_blocking=True).to(self.decoder.dtype)
            mask = batch["input_features_mask"].to(self.device, non_blocking=True)
            hidden = encode(model.model.audio_tower, features, mask)
            projected = model.model.multi_modal_projector(hidden)
            counts = [int((prepared[j].input_ids == self._audio_token_id).sum()) for j in group]
            for j, part in zip(group, projected.split(counts), strict=True):
                results[j] = part
            group = [i] if i >= 0 else []
        out: list[torch.Tensor] = []
        for r in results:
            if r is None:
                raise RuntimeError("the encoder produced no output for a clip")
            out.append(r)
        return out

    # ---- decode ----

    def decode(self, rows: int, max_pages: int) -> torch.Tensor:
        """One greedy step for rows 0..rows-1 (a graph replay when one is captured); the tokens, on the device."""
        profiling = self._config.profile
        t0 = time.perf_counter()
        if profiling:
            t0 = self._mark("drain", t0)
        graph = self._graphs.get(rows)
        if graph is not None:
            graph.replay()
        else:
            self.decoder.decode_step(self.buffers, self.cache, rows, max_pages)
        if profiling:
            now = self._mark("decode", t0)
            self.decode_ms_by_bucket.setdefault(rows, []).append((now - t0) * 1000)
        return self.buffers.out_tokens[:rows]

    def to_host(self, tokens: torch.Tensor) -> HostTokens:
        """Starts the copy of `tokens` to the host (a pinned buffer and an event on CUDA; a clone elsewhere)."""
        if self.cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            return HostTokens(event, host)
        return HostTokens(None, tokens.clone())

    # ---- CUDA graphs ----

    def capture_graphs(self) -> None:
        """One graph per bucket over the static buffers, all rows inactive (scratch page) during capture."""
        b = self.buffers
        saved = (b.tokens.clone(), b.positions.clone(), b.active.clone())
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for rows in self.buckets:
                # Warm up (Triton compiles per bucket) outside capture.
                self.decoder.decode_step(b, self.cache, rows, 1)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for rows in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            # An explicit capture stream on this device: torch's default one is created once per process, on
            # whichever device captured first, and would move a second replica's capture onto that device.
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.decoder.decode_step(b, self.cache, rows, 1)
            self._graphs[rows] = graph
        b.tokens.copy_(saved[0])
        b.positions.copy_(saved[1])
        b.active.copy_(saved[2])
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode graphs (batch sizes %s)", len(self._graphs), self.buckets)
