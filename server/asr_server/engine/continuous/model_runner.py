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
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from asr_server.audio.formats import MODEL_SAMPLE_RATE_HZ
from asr_server.config import ContinuousConfig
from asr_server.engine.continuous.attention import num_splits_for
from asr_server.engine.continuous.decoder import DecodeBuffers, KvCache, PagedDecoder
from asr_server.engine.continuous.encoder import encode
from asr_server.engine.continuous.features import TorchFeatureExtractor
from asr_server.engine.continuous.output import SampledValues
from asr_server.engine.continuous.scheduler import PrefillWork
from asr_server.engine.continuous.stream_cache import (
    CachedPrefix,
    CachedWindow,
    StreamEncoderCache,
    reusable,
    samples_digest,
    stable_windows,
    window_sample_range,
)
from asr_server.engine.generate_core import PreparedInputs
from asr_server.models.loading import LoadedAsrModel

logger = logging.getLogger(__name__)

# The attention backends the encoder and the prefill may use: every one but cuDNN's. cuDNN builds an execution
# graph for each new shape (hundreds of ms of host time, with the GPU idle) and transformers prefers it on Hopper;
# live streams give every prefill a new shape (clip lengths, batch composition), so with it an H200 served 64
# streams at 5 engine steps a second and 3% GPU use (bench/run_gpu.sh streamdiag). Flash and memory-efficient
# attention have no per-shape set-up.
_PREFILL_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

_DEFAULT_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def resolve_features(mode: str, device: torch.device) -> str:
    """The feature path a `features` setting means on `device`: auto is torch on CUDA, else the reference."""
    if mode not in ("auto", "reference", "torch"):
        raise ValueError(f"features must be auto, reference or torch, not {mode!r}")
    if mode == "auto":
        return "torch" if device.type == "cuda" else "reference"
    return mode


@dataclass(frozen=True)
class Sampled:
    """Tokens of one launched unit (a prefill or a decode step) on the device, with each one's log-probability
    under the model, computed in the same step (decoder.PagedDecoder._sample)."""

    tokens: torch.Tensor  # (n,) int64
    logprobs: torch.Tensor  # (n,) float32


@dataclass
class HostTokens:
    """Tokens of one launched unit (a prefill or a decode step) on their way to the host, with their
    log-probabilities (copied in the same transfer batch)."""

    event: torch.cuda.Event | None
    host: torch.Tensor
    host_logprobs: torch.Tensor

    def values(self) -> SampledValues:
        """Waits for the copy; the tokens, carrying their log-probabilities."""
        if self.event is not None:
            self.event.synchronize()
        tokens: list[int] = self.host.tolist()
        logprobs: list[float] = self.host_logprobs.tolist()
        return SampledValues(tokens, logprobs)


@dataclass
class PrefillComputed:
    """A prefill's device results before its rows go into the decode buffers: the indices (into `inputs`) of
    the prompts it finished; for each, the token its row decodes from, that token's position and its EOS flag;
    the tokens the host gets (`tokens`, `logprobs`: `counts[j]` for done prompt j, in order: its first token, or
    with a draft of k tokens the greedy token after its prompt and after each draft token, k + 1); `ready` marks
    its work on the side stream."""

    inputs: tuple[PrefillInput, ...]
    done: list[int]
    first: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor
    counts: list[int]
    suppress: torch.Tensor
    ready: torch.cuda.Event | None = None

    def device_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.first, self.positions, self.tokens, self.logprobs, self.suppress)


@dataclass(frozen=True)
class PrefillInput:
    """One request's part of a prefill: what the scheduler planned, its prepared inputs (features None: the
    runner computes them from `audio`, 16 kHz samples), its EOS rule, and (a recompute after preemption) the
    tokens it had generated, prefilled after the prompt."""

    work: PrefillWork
    prepared: PreparedInputs
    suppress_eos: bool
    generated: tuple[int, ...] = ()
    audio: np.ndarray[Any, Any] | None = None
    # A live stream utterance's key (DecodeRequest.stream_key): its completed encoder windows are cached.
    stream_key: str | None = None
    # Its stable windows' sample digests (ModelRunner.window_digests), computed as it arrived; None: computed here.
    digests: tuple[bytes, ...] | None = None
    # Tokens prefilled after the prompt and verified there (a live final's draft; whole prompts only).
    draft: tuple[int, ...] = ()

    @property
    def prompt_tokens(self) -> int:
        return int(self.prepared.input_ids.shape[1])


@dataclass
class _Prompt:
    """A request's prefill in progress (with chunked prefill it spans steps)."""

    ids: torch.Tensor  # (T,) int64 on the host: the prompt, then any tokens generated before a preemption
    audio: torch.Tensor  # (T,) bool: which ids are audio placeholders
    audio_before: list[int]  # audio placeholders before token t (T + 1 entries)
    # (mel_bins, frames) on the device, in the model's dtype, zero-padded to whole encoder windows.
    features: torch.Tensor
    valid_frames: int
    windows: list[int]  # audio tokens per encoder window
    window_starts: list[int]  # the audio token each window starts at
    encoded: dict[int, torch.Tensor] = field(default_factory=dict)  # window -> its projected encoder output
    encoded_frames: int = 0  # mel frames this request ran through the encoder (cached windows not counted)
    # A keyed request with torch features: what its stable windows store in the stream cache.
    stream_key: str | None = None
    floor: float = 0.0
    window_min: list[float] = field(default_factory=list)
    digests: dict[int, bytes] = field(default_factory=dict)  # stable window -> digest of the samples it reads
    reused: set[int] = field(default_factory=set)  # windows taken from the stream cache
    head: tuple[int, ...] = ()  # the ids before the first audio token (the template head)
    # Leading tokens whose K/V were copied into the request's pages from the stream cache: its prefill starts there.
    kv_reused_tokens: int = 0
    prefilled_tokens: int = 0  # tokens this request ran through the decoder's prefill (KV copied in not counted)


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
            # The decode steps' stream (the engine thread's), and the one prefills beside them run on.
            self._main_stream = torch.cuda.current_stream(self.device)
            self._side_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
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
            out_logprobs=torch.zeros(self.rows, dtype=torch.float32, device=dev),
        )
        # Rows whose buffers hold a request (set when its prefill is in): they decode, and go inactive on release.
        self._live_rows: set[int] = set()
        self._released: list[int] = []  # released rows whose device state is not reset yet (`_flush_released`)
        self.buckets = [b for b in _DEFAULT_BUCKETS if b < self.rows] + [self.rows]
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            for b in self.buckets:
                self.decoder.splits_by_batch[b] = num_splits_for(b, self.decoder.kv_heads, props.multi_processor_count)
        self._graphs: dict[int, Any] = {}
        tower = model.model.audio_tower
        self._n_window = int(tower.n_window)
        # The encoder's attention window in mel frames (8 s): windows are encoded independently.
        self._window_frames = int(tower.n_window_infer)
        if self._window_frames % (2 * self._n_window):
            raise ValueError("the encoder's window is not a whole number of its 1 s chunks")
        self._prompts: dict[str, _Prompt] = {}
        self.features_on_device = resolve_features(config.features, self.device) == "torch"
        self._features: TorchFeatureExtractor | None = None
        if self.features_on_device:
            self._features = TorchFeatureExtractor(loaded.processor, n_window=self._n_window, device=self.device)
        self.profile: dict[str, float] = {}
        self.decode_ms_by_bucket: dict[int, list[float]] = {}
        # Mel frames per audio second (the extractor's hop at 16 kHz), for the encoded-seconds count.
        self._frames_per_s = MODEL_SAMPLE_RATE_HZ / int(loaded.processor.feature_extractor.hop_length)
        self.stream_cache = StreamEncoderCache(
            config.stream_cache_max_streams if self.features_on_device else 0,
            config.stream_cache_max_windows,
            int(config.stream_cache_max_mib * 2**20),
            config.stream_cache_idle_s,
            int(config.stream_cache_max_kv_mib * 2**20),
        )
        # Audio seconds each recent request ran through the encoder (windows reused from the stream cache are
        # not counted) and tokens it ran through the decoder's prefill (KV copied from the stream cache not
        # counted), by request id, for tests and benchmarks; and the totals.
        self.encoded_audio_s: OrderedDict[str, float] = OrderedDict()
        self.encoded_audio_s_total = 0.0
        self.prefilled_tokens: OrderedDict[str, int] = OrderedDict()
        self.prefilled_tokens_total = 0

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
            # Leave room for the encoder's micro-batches, the prefill activations, the graphs and the stream
            # cache's KV prefixes (kept outside the pages).
            reserve = 6 * 2**30
            if resolve_features(cfg.features, self.device) == "torch" and cfg.stream_cache_max_streams > 0:
                reserve += int(cfg.stream_cache_max_kv_mib * 2**20)
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
        """The row's request is gone: the row goes inactive and points at the scratch page, on the device before
        the next decode step or row insert (`_flush_released`)."""
        if row not in self._live_rows:
            return
        self._live_rows.discard(row)
        self._released.append(row)

    def _flush_released(self) -> None:
        """The rows released since the last flush, all at once: one small index copy and two fills, where a fill
        per row was two launches each (a step that ends ~90 interims made ~180)."""
        if not self._released:
            return
        index = _to_device(self._released, torch.long, self.device)
        self._released = []
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

    def drop_prompt(self, request_id: str) -> None:
        """Forgets a request's prefill in progress (it finished, failed, was aborted or preempted)."""
        self._prompts.pop(request_id, None)

    def prefill(self, inputs: Sequence[PrefillInput]) -> tuple[Sampled, list[int]]:
        """Prefills prompt chunks into their pages (whole prompts when the scheduler does not chunk): the first
        chunk of a request sets up its features (one batched torch call on the device for every clip here that
        has none from the preprocess threads), the audio encoder runs over the 8 s windows the chunks' audio
        tokens fall in (windows are independent: encoder attention never crosses them), and the decoder attends
        each chunk to its own earlier chunks through its pages. Requests whose chunk ends their prompt get their
        rows in the decode buffers; returns their tokens for the host and log-probabilities (on the device), in
        input order, and how many each has (PrefillComputed: one, or with a draft of k tokens k + 1).

        Changes no state a retry depends on before its last stage (the row inserts): the prompts' state it sets
        up is rebuilt or still valid, and the pages are simply written again.
        """
        with sdpa_kernel(_PREFILL_SDPA_BACKENDS):
            computed = self._prefill(inputs)
        return self._commit(computed, range(len(computed.done)))

    # ---- prefill beside the decode steps (async_prefill) ----

    def prefill_ordering(self) -> torch.cuda.Event | None:
        """Engine thread, before an async prefill is handed to its thread: marks the work queued so far on the
        decode stream, which the prefill waits for (a page it writes may still be written by a decode step of the
        request that held it before: launched, its token dropped, but its KV write still to land)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        return event

    def prefill_on_side(self, inputs: Sequence[PrefillInput], after: torch.cuda.Event | None) -> PrefillComputed:
        """The prefill thread: everything of `prefill` but the row inserts (`commit`, on the engine thread), on a
        CUDA stream of its own, so decode steps run on meanwhile. Touches only the prompts of `inputs`, its own
        stream's tensors and the KV pages those requests were given."""
        with torch.inference_mode(), sdpa_kernel(_PREFILL_SDPA_BACKENDS):
            if not self.cuda:
                return self._prefill(inputs)
            torch.cuda.set_device(self.device)
            stream = self._side_stream
            if after is not None:
                stream.wait_event(after)
            with torch.cuda.stream(stream):
                computed = self._prefill(inputs)
                computed.ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
                computed.ready.record(stream)
            # Read on the decode stream by the commit: the allocator must not hand their memory to later side
            # work before that.
            for tensor in computed.device_tensors():
                tensor.record_stream(self._main_stream)
            return computed

    def wait_side(self) -> None:
        """After a failed side prefill: its launched work is done before anything writes those pages again."""
        if self.cuda:
            self._side_stream.synchronize()

    def commit(self, computed: PrefillComputed, keep: Sequence[int]) -> tuple[Sampled, list[int]]:
        """Engine thread: the rows of the finished prompts `keep` (indices into computed.done; requests aborted
        meanwhile left out) go into the decode buffers, after the prefill's device work (an ordering on the
        decode stream, no host wait). Their tokens for the host, on the device, in `keep` order, and how many
        each has (PrefillComputed)."""
        if computed.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(computed.ready)
        return self._commit(computed, keep)

    def _commit(self, computed: PrefillComputed, keep: Sequence[int]) -> tuple[Sampled, list[int]]:
        dev = self.device
        keep = list(keep)
        first, positions, suppress = computed.first, computed.positions, computed.suppress
        tokens, logprobs = computed.tokens, computed.logprobs
        if len(keep) != len(computed.done):
            index = _to_device(keep, torch.long, dev)
            first, positions = first.index_select(0, index), positions.index_select(0, index)
            suppress = suppress.index_select(0, index)
            begins = np.cumsum([0, *computed.counts]).tolist()
            rows = [r for k in keep for r in range(begins[k], begins[k] + computed.counts[k])]
            chosen = _to_device(rows, torch.long, dev)
            tokens, logprobs = tokens.index_select(0, chosen), logprobs.index_select(0, chosen)
        if keep:
            items = [computed.inputs[computed.done[k]] for k in keep]
            self._insert_rows(items, first, positions, suppress)
        return Sampled(tokens, logprobs), [computed.counts[k] for k in keep]

    def _prefill(self, inputs: Sequence[PrefillInput]) -> PrefillComputed:
        profiling = self._config.profile
        t0 = time.perf_counter()
        if profiling:
            t0 = self._mark("drain", t0)
        for item in inputs:
            work = item.work
            if work.total_tokens != item.prompt_tokens + len(item.generated) + len(item.draft):
                raise ValueError("a prefill covers the prompt and the tokens generated before a preemption or a draft")
            if item.draft and (item.generated or work.start_token or not work.completes):
                raise ValueError("a draft is verified in a whole prompt's prefill, never after a preemption")
            if work.start_token == 0:
                self._prompts.pop(work.request_id, None)
            elif work.request_id not in self._prompts:
                raise RuntimeError(f"chunk of {work.request_id} at {work.start_token} without its first chunk")
        self._start_prompts([item for item in inputs if item.work.start_token == 0])
        states = [self._prompts[item.work.request_id] for item in inputs]
        # The token range each request runs this time: its chunk, less the leading tokens whose K/V came from the
        # stream cache (only whole prompts reuse them, so a chunk never starts inside the reused run).
        spans = [
            (max(item.work.start_token, st.kv_reused_tokens), item.work.start_token + item.work.num_tokens)
            for item, st in zip(inputs, states, strict=True)
        ]
        for state, (begin, end) in zip(states, spans, strict=True):
            state.prefilled_tokens += end - begin
        if profiling:
            t0 = self._mark("features", t0)
        audio_embeds = self._encode_chunks(states, spans)
        if profiling:
            t0 = self._mark("encoder", t0)
        decoder = self.decoder
        dev = self.device
        page = self._config.page_size
        # Every host-to-device copy here is non-blocking: a blocking one waits for all the work queued on the
        # prefill's stream (the encoder's), and the host then launches the decoder only after the GPU went idle.
        ids = torch.cat([state.ids[begin:end] for state, (begin, end) in zip(states, spans, strict=True)]).to(
            dev, non_blocking=True
        )
        embeds = decoder.embed(ids)
        # The audio placeholders' positions, found on the host (a boolean index on the device syncs with it).
        audio_at = (
            torch.cat([state.audio[begin:end] for state, (begin, end) in zip(states, spans, strict=True)])
            .nonzero()
            .squeeze(-1)
        )
        if audio_embeds:
            audio = torch.cat(audio_embeds).to(embeds.dtype)
            if int(audio.shape[0]) != int(audio_at.numel()):
                raise RuntimeError(f"audio features ({audio.shape[0]}) and audio tokens do not match")
            embeds.index_copy_(0, audio_at.to(dev, non_blocking=True), audio)
        lengths = [end - begin for begin, end in spans]
        starts = [begin for begin, _ in spans]
        slot_pages: list[int] = []
        slot_offsets: list[int] = []
        for item, (begin, end) in zip(inputs, spans, strict=True):
            positions = range(begin, end)
            owned = item.work.pages
            slot_pages.extend(owned[t // page] for t in positions)
            slot_offsets.extend(t % page for t in positions)
        suppress = _to_device([item.suppress_eos for item in inputs], torch.bool, dev)
        # The packed rows whose next token is sampled: each chunk's last, and before it one per draft token.
        counts = [1 + len(item.draft) for item in inputs]
        ends = np.cumsum(lengths).tolist()
        sample_rows = [r for end, count in zip(ends, counts, strict=True) for r in range(end - count, end)]
        drafted = any(count > 1 for count in counts)
        after, after_logprobs = decoder.prefill(
            embeds,
            lengths,
            _to_device(slot_pages, torch.long, dev),
            _to_device(slot_offsets, torch.long, dev),
            self.cache,
            _to_device(
                [item.suppress_eos for item, count in zip(inputs, counts, strict=True) for _ in range(count)],
                torch.bool,
                dev,
            )
            if drafted
            else suppress,
            starts,
            [item.work.pages for item in inputs],
            sample_rows if drafted else None,
        )
        if profiling:
            self._mark("prefill", t0)
        done = [i for i, item in enumerate(inputs) if item.work.completes]
        computed = self._verified(inputs, done, counts, after, after_logprobs, suppress)
        for i in done:
            st = self._prompts.pop(inputs[i].work.request_id, None)
            if st is not None:
                self._finish_prompt(inputs[i].work, st)
        return computed

    def _verified(
        self,
        inputs: Sequence[PrefillInput],
        done: list[int],
        counts: list[int],
        tokens: torch.Tensor,
        logprobs: torch.Tensor,
        suppress: torch.Tensor,
    ) -> PrefillComputed:
        """The finished prompts' rows: with no draft, the token after the prompt at the position after it; with a
        draft d of k tokens and g the greedy tokens after the prompt and after each d_i (k + 1), the accepted
        length a (the longest prefix with g_i == d_i), then g_a at the position after the prompt and d_0..d_a-1
        (greedy speculative verification: the K/V of the accepted tokens are in the pages; those of the rejected
        ones are overwritten from there on). Found on the device, no host wait; the host finds a again from g."""
        dev = self.device
        begins = np.cumsum([0, *counts]).tolist()
        if len(done) != len(inputs):
            rows = [r for i in done for r in range(begins[i], begins[i] + counts[i])]
            chosen = _to_device(rows, torch.long, dev)
            tokens, logprobs = tokens.index_select(0, chosen), logprobs.index_select(0, chosen)
            suppress = suppress.index_select(0, _to_device(done, torch.long, dev))
        done_counts = [counts[i] for i in done]
        after_prompt = [inputs[i].work.total_tokens - len(inputs[i].draft) for i in done]
        if all(count == 1 for count in done_counts):
            positions = torch.tensor(after_prompt, dtype=torch.long).to(dev, non_blocking=True)
            return PrefillComputed(tuple(inputs), done, tokens, positions, tokens, logprobs, done_counts, suppress)
        longest = max(done_counts) - 1
        own = np.cumsum([0, *done_counts[:-1]])
        # (done, longest + 1): each one's greedy tokens, the index clamped to its own (the last repeated).
        offsets = np.minimum(np.arange(longest + 1)[None, :], np.asarray(done_counts)[:, None] - 1)
        gather = torch.from_numpy((own[:, None] + offsets).astype(np.int64)).to(dev, non_blocking=True)
        drafts = torch.full((len(done), longest), -1, dtype=torch.long)
        for j, i in enumerate(done):
            drafts[j, : len(inputs[i].draft)] = torch.tensor(inputs[i].draft, dtype=torch.long)
        greedy = tokens[gather]
        agree = greedy[:, :longest] == drafts.to(dev, non_blocking=True)
        accepted = agree.to(torch.long).cumprod(dim=1).sum(dim=1)
        first = greedy.gather(1, accepted[:, None])[:, 0]
        positions = torch.tensor(after_prompt, dtype=torch.long).to(dev, non_blocking=True) + accepted
        return PrefillComputed(tuple(inputs), done, first, positions, tokens, logprobs, done_counts, suppress)

    def _finish_prompt(self, work: PrefillWork, st: _Prompt) -> None:
        """A prompt's prefill is done: its encoder and prefill work are recorded, and a keyed one's stable windows
        stored, with the KV of its prompt up to their end."""
        request_id = work.request_id
        seconds = st.encoded_frames / self._frames_per_s
        self.encoded_audio_s[request_id] = seconds
        self.encoded_audio_s_total += seconds
        self.prefilled_tokens[request_id] = st.prefilled_tokens
        self.prefilled_tokens_total += st.prefilled_tokens
        while len(self.encoded_audio_s) > 4096:
            self.encoded_audio_s.popitem(last=False)
        while len(self.prefilled_tokens) > 4096:
            self.prefilled_tokens.popitem(last=False)
        if st.stream_key is None or not st.digests:
            return
        windows: dict[int, CachedWindow] = {}
        for w, digest in st.digests.items():
            encoded = st.encoded.get(w)
            if encoded is None:
                continue
            # A fresh window is a view into its micro-batch's output: copied, so the entry holds only its own.
            kept = encoded if w in st.reused else encoded.clone()
            windows[w] = CachedWindow(digest, st.window_min[w], st.floor, kept)
        self.stream_cache.store(st.stream_key, windows, time.monotonic(), self._kv_prefix(work, st, windows))

    def _kv_prefix(self, work: PrefillWork, st: _Prompt, windows: dict[int, CachedWindow]) -> CachedPrefix | None:
        """A copy of the KV pages holding the prompt's head and the audio tokens of its leading stored windows
        (enqueued on the prefill's stream, after the prefill wrote them); None when there are none or no KV is
        kept."""
        run = 0
        while run in windows:
            run += 1
        if run == 0 or self.stream_cache.max_prefix_bytes <= 0:
            return None
        tokens = len(st.head) + st.window_starts[run - 1] + st.windows[run - 1]
        if tokens >= work.total_tokens:
            return None
        pages = torch.tensor(work.pages[: -(-tokens // self._config.page_size)], dtype=torch.long).to(
            self.device, non_blocking=True
        )
        keys = self.cache.all_keys.index_select(1, pages)
        values = self.cache.all_values.index_select(1, pages)
        return CachedPrefix(st.head, run, tokens, keys, values)

    def _reuse_kv_prefix(
        self, st: _Prompt, work: PrefillWork, key: str
    ) -> tuple[Sequence[int], CachedPrefix, int] | None:
        """A whole prompt whose head matches the key's cached KV prefix and whose leading windows all came from
        the cache: the K/V of the head and of those windows' audio tokens are to be copied into its pages (the
        decoder is causal: they are what its own prefill would write there), and its prefill starts after them.
        Returns the copy (its pages, the prefix, how many of its pages); `_copy_kv_prefixes` makes them all."""
        prefix = self.stream_cache.prefix(key)
        if prefix is None or prefix.head != st.head or work.start_token != 0 or not work.completes:
            return None
        run = 0
        while run < prefix.windows and run in st.reused:
            run += 1
        if run == 0:
            return None
        tokens = len(st.head) + st.window_starts[run - 1] + st.windows[run - 1]
        if tokens > prefix.tokens or tokens >= work.total_tokens:
            return None
        st.kv_reused_tokens = tokens
        self.stream_cache.prefix_hits += 1
        count = -(-tokens // self._config.page_size)
        return work.pages[:count], prefix, count

    def _copy_kv_prefixes(self, copies: Sequence[tuple[Sequence[int], CachedPrefix, int]]) -> None:
        """Every reused prefix of a prefill into its request's pages: per request one indexed copy of K and one of
        V over all layers (one per layer made ~5,000 launches for a live-stream prefill of ~90 prompts), the page
        ids in one host-to-device copy. Not one copy for all: its source would be a gathered temporary as large as
        every prefix together (GBs at ~90 prompts). Whole pages: each last one's slots past the prefix are
        overwritten by the prefill before anything reads them."""
        if not copies:
            return
        pages = torch.tensor([p for owned, _, _ in copies for p in owned], dtype=torch.long)
        on_device = pages.to(self.device, non_blocking=True)
        begin = 0
        for _, prefix, count in copies:
            mine = on_device[begin : begin + count]
            self.cache.all_keys.index_copy_(1, mine, prefix.keys[:, :count])
            self.cache.all_values.index_copy_(1, mine, prefix.values[:, :count])
            begin += count

    def _start_prompts(self, items: Sequence[PrefillInput]) -> None:
        """The prefill state of requests starting their prefill: ids, audio positions and features (torch
        features for every clip without any, batched on the device)."""
        if not items:
            return
        need = [i for i, item in enumerate(items) if item.prepared.input_features is None]
        computed: dict[int, tuple[torch.Tensor, int, float | None, list[float] | None]] = {}
        if need:
            by_need = self._torch_features([items[i] for i in need])
            computed = {need[j]: value for j, value in by_need.items()}
        window = self._window_frames
        copies: list[tuple[Sequence[int], CachedPrefix, int]] = []
        for i, item in enumerate(items):
            floor: float | None = None
            window_min: list[float] | None = None
            if i in computed:
                features, valid_frames, floor, window_min = computed[i]
            else:
                features, valid_frames = item.prepared.input_features, int(item.prepared.input_features_mask.sum())
                features = features[0].to(self.device, non_blocking=True).to(self.decoder.dtype)
                frames = int(features.shape[1])
                features = torch.nn.functional.pad(features, (0, -(-frames // window) * window - frames))
            prompt = item.prepared.input_ids[0]
            ids = prompt
            audio = prompt == self._audio_token_id
            after = item.generated or item.draft
            if after:
                # Only the prompt holds audio placeholders; a generated (or draft) token of the same id is a token.
                ids = torch.cat([prompt, torch.tensor(after, dtype=prompt.dtype)])
                audio = torch.cat([audio, torch.zeros(len(after), dtype=torch.bool)])
            windows = self._window_tokens(valid_frames)
            audio_before: list[int] = torch.cat([torch.zeros(1, dtype=torch.long), audio.cumsum(0)]).tolist()
            head_len = audio_before.index(1) - 1 if audio_before[-1] else 0
            self._prompts[item.work.request_id] = _Prompt(
                ids=ids,
                audio=audio,
                audio_before=audio_before,
                features=features,
                valid_frames=valid_frames,
                windows=windows,
                window_starts=[sum(windows[:w]) for w in range(len(windows))],
                head=tuple(prompt[:head_len].tolist()),
            )
            if item.stream_key is not None and floor is not None and window_min is not None and item.audio is not None:
                st = self._prompts[item.work.request_id]
                self._reuse_windows(st, item, item.stream_key, item.audio, floor, window_min)
                copy = self._reuse_kv_prefix(st, item.work, item.stream_key)
                if copy is not None:
                    copies.append(copy)
        self._copy_kv_prefixes(copies)

    def window_digests(self, audio: np.ndarray[Any, Any]) -> tuple[bytes, ...]:
        """The digest of the samples each stable window of `audio` reads (stream_cache.py), in window order.
        Pure and thread-safe: the core computes it on the preprocess threads (hashlib releases the GIL), off the
        engine thread, as the request arrives."""
        extractor = self._features
        if extractor is None:
            return ()
        samples = np.asarray(audio, dtype=np.float32).reshape(-1)
        window_samples = self._window_frames * extractor.hop_samples
        reach = extractor.reach_samples
        stable = stable_windows(int(samples.shape[0]), window_samples, reach)
        return tuple(
            samples_digest(samples[slice(*window_sample_range(w, window_samples, reach))]) for w in range(stable)
        )

    def _reuse_windows(
        self,
        st: _Prompt,
        item: PrefillInput,
        key: str,
        audio: np.ndarray[Any, Any],
        floor: float,
        window_min: list[float],
    ) -> None:
        """A keyed request's stable windows: their digests, and the cached encoder output of each that is provably
        unchanged since the key's last request (stream_cache.py states the conditions)."""
        if not self.stream_cache.enabled:
            return
        digests = item.digests if item.digests is not None else self.window_digests(audio)
        st.stream_key = key
        st.floor = floor
        st.window_min = window_min
        now = time.monotonic()
        for w, digest in enumerate(digests[: len(st.windows)]):
            st.digests[w] = digest
            cached = self.stream_cache.get(key, w, now)
            if cached is not None and reusable(cached, digest, window_min[w], floor):
                st.encoded[w] = cached.encoded
                st.reused.add(w)
                self.stream_cache.hits += 1
            else:
                self.stream_cache.misses += 1

    def _torch_features(
        self, items: Sequence[PrefillInput]
    ) -> dict[int, tuple[torch.Tensor, int, float | None, list[float] | None]]:
        """Features (mel_bins, frames; the decoder's dtype, zeros up to a whole number of encoder windows) and valid
        frames of each item's clip, by index: one batched call on the device per `encoder_batch_audio_s` of padded
        audio (clips sorted by length, so a batch pads little), cast and padded once per batch, each clip a view; for
        keyed items (live streams, with the stream cache on) also the clamp floor and the per-window minima
        before the clamp (a host sync, paid only by groups holding one). The samples were bounded on the
        preprocess threads (require_bounded_samples), so the features are finite without a look on the device."""
        if self._features is None:
            raise RuntimeError("features are missing and the engine computes none (features=reference)")
        clips: list[np.ndarray[Any, Any]] = []
        for item in items:
            if item.audio is None:
                raise RuntimeError(f"no audio for the features of {item.work.request_id}")
            clips.append(item.audio)
        order = sorted(range(len(items)), key=lambda i: int(clips[i].shape[-1]))
        budget = max(1, int(self._config.encoder_batch_audio_s * 16000))
        groups: list[list[int]] = []
        for i in order:
            if groups and (len(groups[-1]) + 1) * int(clips[i].shape[-1]) <= budget:
                groups[-1].append(i)
            else:
                groups.append([i])
        out: dict[int, tuple[torch.Tensor, int, float | None, list[float] | None]] = {}
        window = self._window_frames
        for group in groups:
            keyed = self.stream_cache.enabled and any(items[i].stream_key is not None for i in group)
            chosen = [clips[i] for i in group]
            batch = self._features(chosen, stats_window_frames=self._window_frames) if keyed else self._features(chosen)
            floors: list[float] | None = None
            minima: list[list[float]] | None = None
            if batch.floors is not None and batch.window_min is not None:
                floors = batch.floors.tolist()
                minima = batch.window_min.tolist()
            longest = int(batch.input_features.shape[-1])
            # Rows are zeros past their own frames, as the padding per clip was.
            padded = torch.nn.functional.pad(batch.input_features, (0, -(-longest // window) * window - longest))
            padded = padded.to(self.decoder.dtype)
            for row, i in enumerate(group):
                if batch.num_audio_tokens[row] != int((items[i].prepared.input_ids == self._audio_token_id).sum()):
                    raise RuntimeError("torch features and the prompt disagree on the audio token count")
                out[i] = (
                    padded[row, :, : -(-batch.frames[row] // window) * window],
                    batch.valid_frames[row],
                    None if floors is None else floors[row],
                    None if minima is None else minima[row],
                )
        return out

    def _window_tokens(self, valid_frames: int) -> list[int]:
        """Audio tokens of each encoder window of a clip with `valid_frames` frames (the encoder's own formula)."""
        window = self._window_frames
        counts = []
        for begin in range(0, max(valid_frames, 1), window):
            frames = min(window, valid_frames - begin)
            chunk = 2 * self._n_window
            leave = frames % chunk
            feat = (leave - 1) // 2 + 1
            counts.append(((feat - 1) // 2 + 1 - 1) // 2 + 1 + (frames // chunk) * 13)
        return counts

    def _encode_chunks(self, states: Sequence[_Prompt], spans: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """The audio embeddings of the audio tokens in each request's token span [begin, end) (in order; spans
        without audio give none): the windows they reach that are not encoded yet run through the encoder, windows
        of every request together, longest first, in micro-batches of at most `encoder_batch_audio_s` (each padded
        to its longest window)."""
        window = self._window_frames
        chunk = 2 * self._n_window
        todo: list[tuple[_Prompt, int, int]] = []  # (prompt, window, frames to feed: whole 1 s chunks)
        for st, (begin_token, end_token) in zip(states, spans, strict=True):
            begin = st.audio_before[begin_token]
            end = st.audio_before[end_token]
            # Windows are not all encoded in order: some may come from the stream cache.
            w = 0
            while w < len(st.windows) and st.window_starts[w] < end:
                if w not in st.encoded and st.window_starts[w] + st.windows[w] > begin:
                    valid = min(window, st.valid_frames - w * window)
                    todo.append((st, w, -(-valid // chunk) * chunk))
                w += 1
        todo.sort(key=lambda t: -t[2])
        per_batch = max(1, int(self._config.encoder_batch_audio_s * 100) // window)
        model = self._model
        for group_start in range(0, len(todo), per_batch):
            group = todo[group_start : group_start + per_batch]
            frames = group[0][2]
            # One stack of views (a single copy kernel), not one copy per window.
            features = torch.stack([st.features[:, w * window : w * window + frames] for st, w, _ in group])
            lengths = torch.tensor([min(window, st.valid_frames - w * window) for st, w, _ in group])
            inside = torch.arange(frames)[None, :] < lengths[:, None]
            # On the host: encode() derives its indices from it there, without waiting for the device.
            hidden = encode(model.model.audio_tower, features, inside.to(torch.long))
            projected = model.model.multi_modal_projector(hidden)
            counts = [st.windows[w] for st, w, _ in group]
            if int(projected.shape[0]) != sum(counts):
                raise RuntimeError(f"the encoder gave {projected.shape[0]} audio tokens for {sum(counts)}")
            for (st, w, _), part in zip(group, projected.split(counts), strict=True):
                st.encoded[w] = part
                st.encoded_frames += min(window, st.valid_frames - w * window)
        out: list[torch.Tensor] = []
        for st, (begin_token, end_token) in zip(states, spans, strict=True):
            begin = st.audio_before[begin_token]
            end = st.audio_before[end_token]
            if end > begin:
                first = next(w for w in range(len(st.windows)) if st.window_starts[w] + st.windows[w] > begin)
                last = next(w for w in range(len(st.windows)) if st.window_starts[w] + st.windows[w] >= end)
                offset = st.window_starts[first]
                parts = [st.encoded[w] for w in range(first, last + 1)]
                joined = parts[0] if len(parts) == 1 else torch.cat(parts)
                out.append(joined[begin - offset : end - offset])
        return out

    def _insert_rows(
        self, inputs: Sequence[PrefillInput], first: torch.Tensor, positions: torch.Tensor, suppress: torch.Tensor
    ) -> None:
        """The rows' first token, its position (on the device), the block table row and the flags."""
        dev = self.device
        self._flush_released()  # a row released this step may be one of these: its release must not come after
        rows = [item.work.row for item in inputs]
        index = _to_device(rows, torch.long, dev)
        width = self.table_width
        table = _to_device(
            [p for item in inputs for p in (*item.work.pages, *[0] * (width - len(item.work.pages)))], torch.int32, dev
        )
        b = self.buffers
        b.tokens.index_copy_(0, index, first)
        b.positions.index_copy_(0, index, positions)
        b.block_table.index_copy_(0, index, table.view(len(inputs), width))
        b.suppress_eos.index_copy_(0, index, suppress)
        b.active.index_fill_(0, index, True)
        self._live_rows.update(rows)

    # ---- decode ----

    def decode(self, rows: int, max_pages: int) -> Sampled:
        """One greedy step for rows 0..rows-1 (a graph replay when one is captured); the tokens and their
        log-probabilities, on the device."""
        profiling = self._config.profile
        t0 = time.perf_counter()
        if profiling:
            t0 = self._mark("drain", t0)
        # Before the step, in stream order: a released row must not decode into pages already given to another.
        self._flush_released()
        graph = self._graphs.get(rows)
        if graph is not None:
            graph.replay()
        else:
            self.decoder.decode_step(self.buffers, self.cache, rows, max_pages)
        if profiling:
            now = self._mark("decode", t0)
            self.decode_ms_by_bucket.setdefault(rows, []).append((now - t0) * 1000)
        return Sampled(self.buffers.out_tokens[:rows], self.buffers.out_logprobs[:rows])

    def to_host(self, sampled: Sampled) -> HostTokens:
        """Starts the copy of `sampled` to the host (pinned buffers and one event on CUDA; clones elsewhere)."""
        tokens, logprobs = sampled.tokens, sampled.logprobs
        if self.cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            host_logprobs = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True)
            host_logprobs.copy_(logprobs, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            return HostTokens(event, host, host_logprobs)
        return HostTokens(None, tokens.clone(), logprobs.clone())

    # ---- CUDA graphs ----

    def capture_graphs(self) -> None:
        """One graph per bucket over the static buffers, all rows inactive (scratch page) during capture."""
        self._flush_released()
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


def _to_device(values: Sequence[int] | Sequence[bool], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the stream (`torch.tensor(..., device=cuda)` copies
    and then synchronises it)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
