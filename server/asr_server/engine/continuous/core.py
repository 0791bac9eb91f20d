"""ContinuousEngine: an EngineCore with iteration-level scheduling over a paged KV cache.

Each `step()`:
1. admits waiting requests whose features are ready while a row and enough KV pages are free (pages for the
   prompt plus the request's whole token budget are reserved at admission, so a running request never runs out
   and nothing is ever preempted); at most `max_prefill_tokens` prompt tokens per step, so running streams keep
   getting tokens while a burst of long requests is prefilled;
2. runs the audio encoder over the admitted clips in micro-batches of at most `encoder_batch_audio_s` seconds
   (a padded batch of 128 x 120 s needs 44 GB for one conv), then prefills their prompts packed into their pages;
3. runs one greedy decode step for every running row (a CUDA graph replay per batch-size bucket on GPU);
4. reads the tokens of the step before (copied to pinned memory asynchronously), so the host never waits on the
   step it just launched: a request is seen finished one step late, and the extra token is dropped.

Features are computed per clip, equal to the reference preprocessing (generate_core.prepare_single; see
prepare.py), on a small thread pool as requests arrive, off the critical path.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from asr_server.audio.formats import MODEL_SAMPLE_RATE_HZ
from asr_server.config import ContinuousConfig
from asr_server.engine.continuous.attention import num_splits_for
from asr_server.engine.continuous.decoder import DecodeBuffers, KvCache, PagedDecoder
from asr_server.engine.continuous.encoder import encode
from asr_server.engine.continuous.prepare import FastPreparer
from asr_server.engine.core import EngineOutput
from asr_server.engine.generate_core import PreparedInputs, parse_transcription, request_error
from asr_server.engine.types import BatchStats, DecodeOptions, DecodeRequest, DecodeResult, WorkItem
from asr_server.errors import LimitExceeded
from asr_server.models.loading import LoadedAsrModel

__all__ = ["ContinuousConfig", "ContinuousEngine"]

logger = logging.getLogger(__name__)

_DEFAULT_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass
class _Request:
    item: WorkItem
    prepared: Future[PreparedInputs]
    budget: int
    suppress_eos: bool
    row: int = -1
    pages: list[int] = field(default_factory=list)
    prompt_len: int = 0
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    start_ns: int = 0
    first_token_ns: int = 0

    @property
    def request_id(self) -> str:
        return self.item.request.request_id


@dataclass
class _PendingTokens:
    """Tokens of one launched unit (a prefill or a decode step) on their way to the host."""

    event: torch.cuda.Event | None
    host: torch.Tensor
    owners: list[tuple[int, _Request]]  # (index into host, request)


class ContinuousEngine:
    def __init__(self, loaded: LoadedAsrModel, config: ContinuousConfig | None = None) -> None:
        self._loaded = loaded
        self._config = config or ContinuousConfig()
        self.model_id = loaded.model_id
        model = loaded.model
        self._model = model
        self._device = torch.device(loaded.device)
        self._cuda = self._device.type == "cuda"
        if self._cuda:
            # Triton launches and graph captures use the thread's current device: make it this replica's.
            torch.cuda.set_device(self._device)
        cfg = self._config
        triton = cfg.kernels == "triton" or (cfg.kernels == "auto" and self._cuda)
        if cfg.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto or fp8, not {cfg.kv_cache_dtype!r}")
        kv_dtype = torch.float8_e4m3fn if cfg.kv_cache_dtype == "fp8" else None
        self._decoder = PagedDecoder(model, use_triton=triton, fuse_projections=triton, kv_dtype=kv_dtype)
        tokenizer = loaded.processor.tokenizer
        mconfig = model.config
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = mconfig.eos_token_id
        eos_list = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        self._eos_ids = frozenset(eos_list)
        self._decoder.eos_ids = torch.tensor(eos_list, dtype=torch.long, device=self._device)
        self._audio_token_id = int(mconfig.audio_token_id)
        self._tokenizer = tokenizer

        page = cfg.page_size
        self._table_width = -(-cfg.max_context_tokens // page)
        num_pages = self._size_cache(cfg)
        self._cache: KvCache = self._decoder.allocate_cache(num_pages, page)
        self._free_pages: list[int] = list(range(num_pages - 1, 0, -1))  # page 0 is scratch
        self._rows = cfg.max_running
        self._free_rows: list[int] = list(range(self._rows - 1, -1, -1))
        dev = self._device
        self._buffers = DecodeBuffers(
            tokens=torch.zeros(self._rows, dtype=torch.long, device=dev),
            positions=torch.zeros(self._rows, dtype=torch.long, device=dev),
            block_table=torch.zeros((self._rows, self._table_width), dtype=torch.int32, device=dev),
            active=torch.zeros(self._rows, dtype=torch.bool, device=dev),
            suppress_eos=torch.zeros(self._rows, dtype=torch.bool, device=dev),
            out_tokens=torch.zeros(self._rows, dtype=torch.long, device=dev),
        )
        self._row_owner: list[_Request | None] = [None] * self._rows
        self._buckets = [b for b in _DEFAULT_BUCKETS if b < self._rows] + [self._rows]
        if self._cuda:
            props = torch.cuda.get_device_properties(self._device)
            for b in self._buckets:
                splits = num_splits_for(b, self._decoder.kv_heads, props.multi_processor_count)
                self._decoder.splits_by_batch[b] = splits
        self._graphs: dict[int, Any] = {}
        self._preparer = FastPreparer(loaded)
        self._pool = ThreadPoolExecutor(max_workers=cfg.preprocess_threads, thread_name_prefix="asr-prep")
        self._waiting: deque[_Request] = deque()
        self._running: dict[str, _Request] = {}
        self._pending: deque[_PendingTokens] = deque()
        self.steps = 0
        self.profile: dict[str, float] = {}
        self.decode_ms_by_bucket: dict[int, list[float]] = {}
        # Time to first token (ms, from arrival to the host seeing it) of recent requests, for benchmarks.
        self.ttft_ms: deque[float] = deque(maxlen=100_000)
        logger.info(
            "continuous engine on %s: %d KV pages of %d tokens (%d tokens, %.1f GiB), %d rows",
            dev,
            num_pages,
            page,
            num_pages * page,
            num_pages * page * self._decoder.kv_bytes_per_token() / 2**30,
            self._rows,
        )

    # ---- sizing ----

    def _size_cache(self, cfg: ContinuousConfig) -> int:
        per_token = self._decoder.kv_bytes_per_token()
        if cfg.kv_cache_tokens > 0:
            tokens = cfg.kv_cache_tokens
        elif self._cuda:
            free, _total = torch.cuda.mem_get_info(self._device)
            # Leave room for the encoder's micro-batches, the prefill activations and the graphs.
            reserve = 6 * 2**30
            tokens = int(max(0, free * cfg.kv_cache_memory_fraction - reserve) // per_token)
        else:
            tokens = cfg.max_running * 2048
        pages = max(2, tokens // cfg.page_size + 1)
        return pages

    # ---- EngineCore ----

    def warmup(self) -> None:
        rng = np.random.default_rng(0)
        audio = (0.01 * rng.standard_normal(MODEL_SAMPLE_RATE_HZ)).astype(np.float32)
        options = DecodeOptions(language=None, context="", max_new_tokens=4)
        self.add(WorkItem(DecodeRequest("warmup", audio, options, forced_num_tokens=4), time.time_ns(), 0.0))
        while self.num_waiting() or self.num_running():
            self.step()
        if self._cuda and self._config.cuda_graphs:
            self._capture_graphs()

    def add(self, item: WorkItem) -> None:
        request = item.request
        budget = request.forced_num_tokens if request.forced_num_tokens is not None else request.options.max_new_tokens
        prepared = self._pool.submit(self._preparer, request)
        self._waiting.append(_Request(item, prepared, max(1, int(budget)), request.forced_num_tokens is not None))

    def abort(self, request_id: str) -> None:
        for req in list(self._waiting):
            if req.request_id == request_id:
                self._waiting.remove(req)
                req.prepared.cancel()
        req_running = self._running.pop(request_id, None)
        if req_running is not None:
            self._release(req_running)

    def num_waiting(self) -> int:
        return len(self._waiting)

    def num_running(self) -> int:
        return len(self._running)

    def oldest_waiting_monotonic_s(self) -> float | None:
        return self._waiting[0].item.enqueued_monotonic_s if self._waiting else None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._graphs.clear()

    def _mark(self, name: str, since: float) -> float:
        """Profile mode: waits for the device, adds the time since `since` to `name`, returns now."""
        if self._cuda:
            torch.cuda.synchronize(self._device)
        now = time.perf_counter()
        self.profile[name] = self.profile.get(name, 0.0) + (now - since)
        return now

    def step(self) -> list[EngineOutput]:
        outputs: list[EngineOutput] = []
        with torch.inference_mode():
            admitted = self._admit(outputs)
            if admitted:
                self._prefill_isolating_failures(admitted, outputs)
            launched = False
            if any(owner is not None for owner in self._row_owner):
                self._launch_decode()
                launched = True
            # Read everything but the step just launched, so the host never waits on it.
            keep = 1 if launched else 0
            while len(self._pending) > keep:
                outputs.extend(self._collect(self._pending.popleft()))
            if not launched and not admitted and self._running and not self._pending:
                # Nothing in flight but requests still marked running: cannot happen; fail them loudly.
                for req in list(self._running.values()):
                    self._running.pop(req.request_id)
                    self._release(req)
                    outputs.append(EngineOutput(req.request_id, error=RuntimeError("request lost by the engine")))
        self.steps += 1
        return outputs

    # ---- admission ----

    def _admit_now(self) -> bool:
        if not self._waiting or not self._free_rows:
            return False
        if not self._running:
            return True
        oldest_ms = (time.monotonic() - self._waiting[0].item.enqueued_monotonic_s) * 1000
        if oldest_ms >= self._config.prefill_interval_ms:
            return True
        # Enough arrived to make a full prefill anyway (or to take every free row): no reason to wait.
        if len(self._waiting) >= len(self._free_rows):
            return True
        ready_tokens = sum(int(r.item.request.audio_s * 13) + 20 for r in self._waiting)
        return ready_tokens >= self._config.max_prefill_tokens // 2

    def _admit(self, outputs: list[EngineOutput]) -> list[_Request]:
        admitted: list[_Request] = []
        if not self._admit_now():
            return admitted
        prompt_tokens = 0
        page = self._config.page_size
        while self._waiting and self._free_rows:
            req = self._waiting[0]
            # Features are computed in arrival order; a later one being ready first is rare and cheap to wait for.
            if not req.prepared.done() and (admitted or self._running):
                break
            self._waiting.popleft()
            try:
                prepared = req.prepared.result()  # waits when nothing else can run meanwhile
            except Exception as exc:  # noqa: BLE001 - one bad clip fails alone
                outputs.append(EngineOutput(req.request_id, error=request_error(req.request_id, "preprocessing", exc)))
                continue
            prompt_len = int(prepared.input_ids.shape[1])
            need_tokens = prompt_len + req.budget + 1  # +1: the step launched before the host sees the end
            if need_tokens > self._table_width * page:
                outputs.append(
                    EngineOutput(
                        req.request_id,
                        error=LimitExceeded(
                            f"prompt ({prompt_len} tokens) plus max_new_tokens ({req.budget}) exceeds the engine's "
                            f"context of {self._table_width * page} tokens; send shorter chunks or fewer tokens"
                        ),
                    )
                )
                continue
            need_pages = -(-need_tokens // page)
            if need_pages > self._cache.num_pages - 1:
                outputs.append(
                    EngineOutput(
                        req.request_id,
                        error=LimitExceeded(
                            f"request needs {need_tokens} KV tokens, the cache holds "
                            f"{(self._cache.num_pages - 1) * page}"
                        ),
                    )
                )
                continue
            over_prefill = bool(admitted) and prompt_tokens + prompt_len > self._config.max_prefill_tokens
            if need_pages > len(self._free_pages) or over_prefill:
                self._waiting.appendleft(req)
                break
            req.prompt_len = prompt_len
            req.pages = [self._free_pages.pop() for _ in range(need_pages)]
            req.row = self._free_rows.pop()
            req.start_ns = time.time_ns()
            prompt_tokens += prompt_len
            self._running[req.request_id] = req
            admitted.append(req)
        return admitted

    def _release(self, req: _Request) -> None:
        req.finished = True
        if req.pages:
            self._free_pages.extend(req.pages)
            req.pages = []
        if req.row >= 0:
            if self._row_owner[req.row] is req:
                self._row_owner[req.row] = None
                self._deactivate([req.row])
            self._free_rows.append(req.row)
            # Lowest rows first keeps the running rows packed at the start, so the bucket stays small.
            self._free_rows.sort(reverse=True)
            req.row = -1

    def _deactivate(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self._device)
        b = self._buffers
        b.active.index_fill_(0, index, False)
        b.block_table.index_fill_(0, index, 0)

    # ---- encoder + prefill ----

    def _prefill_isolating_failures(self, admitted: list[_Request], outputs: list[EngineOutput]) -> None:
        """Prefills the group; if that fails, each request again on its own, so only the bad one fails.

        _prefill changes no engine state before its last stage, so a failed group leaves nothing to undo: its KV
        pages are simply written again.
        """
        try:
            self._prefill(admitted)
            return
        except Exception as exc:  # noqa: BLE001 - isolated below; the running requests go on
            if len(admitted) == 1:
                self._fail_admitted(admitted[0], exc, outputs)
                return
            logger.exception("prefill of %d requests failed; prefilling them one by one", len(admitted))
        for req in admitted:
            try:
                self._prefill([req])
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                self._fail_admitted(req, exc, outputs)

    def _fail_admitted(self, req: _Request, exc: Exception, outputs: list[EngineOutput]) -> None:
        self._running.pop(req.request_id, None)
        self._release(req)
        outputs.append(EngineOutput(req.request_id, error=request_error(req.request_id, "inference", exc)))

    def _prefill(self, admitted: list[_Request]) -> None:
        prepared = [req.prepared.result() for req in admitted]
        profiling = self._config.profile
        t0 = time.perf_counter()
        if profiling:
            t0 = self._mark("drain", t0)
        audio_embeds = self._encode(prepared)
        if profiling:
            t0 = self._mark("encoder", t0)
        decoder = self._decoder
        dev = self._device
        page = self._config.page_size
        ids = torch.cat([p.input_ids[0] for p in prepared]).to(dev)
        embeds = decoder.embed(ids)
        audio_mask = ids == self._audio_token_id
        audio = torch.cat(audio_embeds).to(embeds.dtype)
        if int(audio.shape[0]) != int(audio_mask.sum().item()):
            raise RuntimeError(f"audio features ({audio.shape[0]}) and audio tokens do not match")
        embeds[audio_mask] = audio
        lengths = [int(p.input_ids.shape[1]) for p in prepared]
        slot_pages: list[int] = []
        slot_offsets: list[int] = []
        for req, n in zip(admitted, lengths, strict=True):
            for t in range(n):
                slot_pages.append(req.pages[t // page])
                slot_offsets.append(t % page)
        suppress = torch.tensor([r.suppress_eos for r in admitted], dtype=torch.bool, device=dev)
        first = decoder.prefill(
            embeds,
            lengths,
            torch.tensor(slot_pages, dtype=torch.long, device=dev),
            torch.tensor(slot_offsets, dtype=torch.long, device=dev),
            self._cache,
            suppress,
        )
        if profiling:
            self._mark("prefill", t0)
        # Insert the rows: first token, its position, the block table row, flags.
        rows = [r.row for r in admitted]
        index = torch.tensor(rows, dtype=torch.long, device=dev)
        table = torch.zeros((len(admitted), self._table_width), dtype=torch.int32)
        for i, req in enumerate(admitted):
            table[i, : len(req.pages)] = torch.tensor(req.pages, dtype=torch.int32)
        b = self._buffers
        b.tokens.index_copy_(0, index, first)
        b.positions.index_copy_(0, index, torch.tensor(lengths, dtype=torch.long, device=dev))
        b.block_table.index_copy_(0, index, table.to(dev, non_blocking=True))
        b.suppress_eos.index_copy_(0, index, suppress)
        b.active.index_fill_(0, index, True)
        for req in admitted:
            self._row_owner[req.row] = req
        self._push_pending(first, [(i, req) for i, req in enumerate(admitted)])

    def _encode(self, prepared: list[PreparedInputs]) -> list[torch.Tensor]:
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
            features = batch["input_features"].to(self._device, non_blocking=True).to(self._decoder.dtype)
            mask = batch["input_features_mask"].to(self._device, non_blocking=True)
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

    def _bucket(self) -> tuple[int, int]:
        highest = max(i for i, owner in enumerate(self._row_owner) if owner is not None)
        rows = next(b for b in self._buckets if b > highest)
        longest = max(
            (owner.prompt_len + len(owner.tokens) + 2 for owner in self._row_owner if owner is not None), default=1
        )
        max_pages = min(self._table_width, -(-longest // self._config.page_size) + 1)
        return rows, max_pages

    def _launch_decode(self) -> None:
        rows, max_pages = self._bucket()
        profiling = self._config.profile
        t0 = time.perf_counter()
        if profiling:
            t0 = self._mark("drain", t0)
        graph = self._graphs.get(rows)
        if graph is not None:
            graph.replay()
        else:
            self._decoder.decode_step(self._buffers, self._cache, rows, max_pages)
        if profiling:
            now = self._mark("decode", t0)
            self.decode_ms_by_bucket.setdefault(rows, []).append((now - t0) * 1000)
        owners = [(i, owner) for i, owner in enumerate(self._row_owner[:rows]) if owner is not None]
        self._push_pending(self._buffers.out_tokens[:rows], owners)

    def _push_pending(self, tokens: torch.Tensor, owners: list[tuple[int, _Request]]) -> None:
        if self._cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            self._pending.append(_PendingTokens(event, host, owners))
        else:
            self._pending.append(_PendingTokens(None, tokens.clone(), owners))

    def _collect(self, pending: _PendingTokens) -> list[EngineOutput]:
        if pending.event is not None:
            pending.event.synchronize()
        values = pending.host.tolist()
        outputs: list[EngineOutput] = []
        done: list[_Request] = []
        for index, req in pending.owners:
            if req.finished:
                continue
            token = int(values[index])
            if not req.tokens:
                req.first_token_ns = time.time_ns()
                self.ttft_ms.append((req.first_token_ns - req.item.enqueued_ns) / 1e6)
            req.tokens.append(token)
            if len(req.tokens) >= req.budget or (not req.suppress_eos and token in self._eos_ids):
                done.append(req)
        if done:
            now = time.time_ns()
            batch_size = sum(1 for owner in self._row_owner if owner is not None)
            for req in done:
                self._running.pop(req.request_id, None)
                self._release(req)
                outputs.append(self._result(req, batch_size, now))
        return outputs

    def _result(self, req: _Request, batch_size: int, end_ns: int) -> EngineOutput:
        request = req.item.request
        try:
            text, language = parse_transcription(self._loaded.processor, request, req.tokens)
        except Exception as exc:  # noqa: BLE001 - a decoding failure is this request's alone
            return EngineOutput(req.request_id, error=RuntimeError(f"decoding the output failed: {exc}"))
        stats = BatchStats(
            batch_size=batch_size,
            audio_s=request.audio_s,
            generated_tokens=len(req.tokens),
            start_ns=req.start_ns,
            end_ns=end_ns,
        )
        result = DecodeResult(
            req.request_id, text, language, tuple(req.tokens), req.item.enqueued_ns, stats, req.first_token_ns
        )
        return EngineOutput(req.request_id, result=result)

    # ---- CUDA graphs ----

    def _capture_graphs(self) -> None:
        """One graph per bucket over the static buffers, all rows inactive (scratch page) during capture."""
        b = self._buffers
        saved = (b.tokens.clone(), b.positions.clone(), b.active.clone())
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self._device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(stream):
            for rows in self._buckets:
                # Warm up (Triton compiles per bucket) outside capture.
                self._decoder.decode_step(b, self._cache, rows, 1)
        torch.cuda.current_stream(self._device).wait_stream(stream)
        for rows in reversed(self._buckets):
            graph = torch.cuda.CUDAGraph()
            # An explicit capture stream on this device: torch's default one is created once per process, on
            # whichever device captured first, and would move a second replica's capture onto that device.
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._decoder.decode_step(b, self._cache, rows, 1)
            self._graphs[rows] = graph
        b.tokens.copy_(saved[0])
        b.positions.copy_(saved[1])
        b.active.copy_(saved[2])
        torch.cuda.synchronize(self._device)
        logger.info("captured %d decode graphs (batch sizes %s)", len(self._graphs), self._buckets)
