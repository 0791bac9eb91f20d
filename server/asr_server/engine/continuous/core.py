"""ContinuousEngine: an EngineCore with iteration-level scheduling over a paged KV cache.

Composed as vLLM v1's engine core is: a torch-free scheduler (scheduler.py) with its KV page manager
(kv_manager.py) decides each step what to prefill and which rows decode; the model runner (model_runner.py) runs
it on the device; the output step (output.py) turns sampled tokens into results. Each `step()`:
1. asks the scheduler for a plan (admission by rows, pages and the per-step prefill budget, or with chunked
   prefill by the step's token budget; pages for the prompt plus the whole token budget are reserved at
   admission unless kv_reservation="lazy");
2. encodes and prefills the admitted requests, or this step's chunks of their prompts (a failed group is retried
   request by request, so only the bad one fails);
3. runs one greedy decode step for every running row;
4. reads the tokens of the step before (copied to pinned memory asynchronously), so the host never waits on the
   step it just launched: a request is seen finished one step late, and the extra token is dropped.

Chunked prefill runs a step's chunks as their own prefill launch just before the step's decode (not one mixed
batch): the decode stays one CUDA graph replay over its static buffers with the paged decode kernel, and a mixed
batch would need a varlen paged attention kernel (queries of many lengths) that we do not have; the decodes then
wait only for one budget-bounded chunk, never for a whole prefill round.

The prompt's ids are made per clip, equal to the reference preprocessing (generate_core.prepare_single; see
prepare.py), on a small thread pool as requests arrive, off the critical path; so are the features with
features="reference". With features="torch" the engine keeps the 16 kHz samples and the model runner computes
the features of every clip whose prefill starts in a step in one batched call on its device.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field

import numpy as np
import torch

from asr_server.audio.formats import MODEL_SAMPLE_RATE_HZ
from asr_server.config import ContinuousConfig
from asr_server.engine.continuous.decoder import KvCache
from asr_server.engine.continuous.kv_manager import KvPageManager
from asr_server.engine.continuous.model_runner import (
    HostTokens,
    ModelRunner,
    PrefillComputed,
    PrefillInput,
    Sampled,
    resolve_features,
)
from asr_server.engine.continuous.output import OutputStep, RequestOutput
from asr_server.engine.continuous.prepare import FastPreparer
from asr_server.engine.continuous.scheduler import DecodeWork, PrefillWork, Rejected, Scheduler, SchedulerOutput
from asr_server.engine.continuous.stream_cache import StreamEncoderCache
from asr_server.engine.continuous.trace import EngineTrace
from asr_server.engine.core import CoreStats, EngineOutput, StepCounter
from asr_server.engine.generate_core import PreparedInputs, request_error
from asr_server.engine.types import DecodeOptions, DecodePriority, DecodeRequest, WorkItem
from asr_server.models.loading import LoadedAsrModel

__all__ = ["ContinuousConfig", "ContinuousEngine"]

logger = logging.getLogger(__name__)

# Audio tokens per second of audio (13) and the template's tokens around them: the prompt's length before its
# features are ready (the prefill-interval rule counts with it).
_AUDIO_TOKENS_PER_S = 13
_TEMPLATE_TOKENS = 20


class _Prepared:
    """A request's features, computed on the pool: the scheduler's PromptSource."""

    def __init__(self, future: Future[PreparedInputs]) -> None:
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def prompt_tokens(self) -> int:
        return int(self.future.result().input_ids.shape[1])

    def cancel(self) -> None:
        self.future.cancel()


@dataclass
class _Request:
    output: RequestOutput
    prepared: _Prepared
    # A live stream's request (stream cache on): its windows' sample digests, hashed on the preprocess threads.
    digests: Future[tuple[bytes, ...]] | None = None
    # The draft its prefill verifies (DecodeRequest.draft_token_ids, cut to what the engine takes).
    draft: tuple[int, ...] = ()
    # --bench-trace-path: when its prompt and features were ready (wall-clock ns).
    prepared_ns: int = 0


@dataclass
class _SidePrefill:
    """The prefill running on its thread (async prefill): what it covers and its outcome."""

    works: tuple[PrefillWork, ...]
    future: Future[PrefillComputed]


# While only an async prefill is in flight (no row decoding), the engine thread waits for it this long per step
# (releasing the GIL the prefill thread needs), then checks its inbox again.
_SIDE_WAIT_S = 0.002


def resolve_async_prefill(config: ContinuousConfig, cuda: bool) -> bool:
    """Whether prefills run beside the decode steps: whole prompts with full page reservation only (chunked
    prefill and lazy pages change a running request's prefill or pages from step to step), never when profiling
    (its phase times synchronise each phase)."""
    if config.async_prefill == "off" or config.max_step_tokens or config.kv_reservation != "full" or config.profile:
        return False
    return config.async_prefill == "on" or cuda


@dataclass
class _Pending:
    """The tokens of one launched unit on their way to the host, and whose they are (index into the tokens); a
    prefill's drafted requests own k + 1 tokens from their index, verified against their draft."""

    tokens: HostTokens
    owners: list[tuple[int, RequestOutput]]
    drafted: list[tuple[int, RequestOutput, tuple[int, ...]]] = field(default_factory=list)


class ContinuousEngine:
    def __init__(self, loaded: LoadedAsrModel, config: ContinuousConfig | None = None) -> None:
        self._loaded = loaded
        self._config = config or ContinuousConfig()
        cfg = self._config
        self.model_id = loaded.model_id
        self._runner = ModelRunner(loaded, cfg)
        self._kv = KvPageManager(self._runner.num_pages, cfg.page_size)
        self._async_prefill = resolve_async_prefill(cfg, self._runner.cuda)
        self._scheduler = Scheduler(cfg, self._kv, deferred_prefill=self._async_prefill)
        self._side_pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr-prefill") if self._async_prefill else None
        )
        self._side: _SidePrefill | None = None
        # Runner calls that touch what a side prefill may be using (prompt states, the stream cache): held back
        # while one runs, made as it is committed.
        self._deferred: list[Callable[[], None]] = []
        self._output = OutputStep(loaded.processor, self._runner.eos_ids)
        on_device = resolve_features(cfg.features, self._runner.device) == "torch"
        self._preparer = FastPreparer(
            loaded, features="torch" if on_device else "reference", compute_features=not on_device
        )
        self._pool = ThreadPoolExecutor(max_workers=cfg.preprocess_threads, thread_name_prefix="asr-prep")
        # Every request added and not yet answered or aborted, waiting or running.
        self._requests: dict[str, _Request] = {}
        self._pending: deque[_Pending] = deque()
        self.steps = 0
        self._counter = StepCounter()
        # Prefill pieces run (whole prompts, or chunks with max_step_tokens), for tests and benchmarks.
        self.prefill_chunks = 0
        self._trace = EngineTrace(cfg.trace_path) if cfg.trace_path else None
        logger.info(
            "continuous engine on %s: %d KV pages of %d tokens (%d tokens, %.1f GiB), %d rows%s",
            self._runner.device,
            self._kv.num_pages,
            cfg.page_size,
            self._kv.num_pages * cfg.page_size,
            self._runner.kv_gib(),
            cfg.max_running,
            ", prefill beside the decode steps" if self._async_prefill else "",
        )

    # ---- what tests and benchmarks read ----

    @property
    def _cache(self) -> KvCache:
        return self._runner.cache

    @property
    def _free_pages(self) -> list[int]:
        return self._kv.free_pages()

    @property
    def _free_rows(self) -> list[int]:
        return self._scheduler.free_rows()

    @property
    def profile(self) -> dict[str, float]:
        """Profile mode: seconds per phase (drain, encoder, prefill, decode), summed."""
        return self._runner.profile

    @property
    def decode_ms_by_bucket(self) -> dict[int, list[float]]:
        return self._runner.decode_ms_by_bucket

    @property
    def ttft_ms(self) -> deque[float]:
        return self._output.ttft_ms

    @property
    def encoded_audio_s(self) -> dict[str, float]:
        """Audio seconds each recent request ran through the encoder, by request id (windows reused from the
        stream cache not counted)."""
        return self._runner.encoded_audio_s

    @property
    def prefilled_tokens(self) -> dict[str, int]:
        """Prompt tokens each recent request ran through the decoder's prefill, by request id (KV copied from the
        stream cache not counted)."""
        return self._runner.prefilled_tokens

    @property
    def stream_cache(self) -> StreamEncoderCache:
        return self._runner.stream_cache

    # ---- EngineCore ----

    def warmup(self) -> None:
        rng = np.random.default_rng(0)
        audio = (0.01 * rng.standard_normal(MODEL_SAMPLE_RATE_HZ)).astype(np.float32)
        options = DecodeOptions(language=None, context="", max_new_tokens=4)
        self.add(WorkItem(DecodeRequest("warmup", audio, options, forced_num_tokens=4), time.time_ns(), 0.0))
        while self.num_waiting() or self.num_running():
            self.step()
        if self._runner.cuda and self._config.cuda_graphs:
            self._runner.capture_graphs()

    def add(self, item: WorkItem) -> None:
        request = item.request
        forced = request.forced_num_tokens
        budget = max(1, int(forced if forced is not None else request.options.max_new_tokens))
        prepared = _Prepared(self._pool.submit(self._preparer, request))
        digests = None
        if request.stream_key is not None and self._runner.stream_cache.enabled:
            digests = self._pool.submit(self._runner.window_digests, request.audio_16k)
        draft = self._draft(request.draft_token_ids, budget)
        entry = _Request(RequestOutput(item, budget, forced is not None), prepared, digests, draft)
        self._requests[request.request_id] = entry
        if self._trace is not None:
            prepared.future.add_done_callback(lambda _: setattr(entry, "prepared_ns", time.time_ns()))
        estimate = int(request.audio_s * _AUDIO_TOKENS_PER_S) + _TEMPLATE_TOKENS
        self._scheduler.add(
            request.request_id,
            item.enqueued_monotonic_s,
            budget,
            estimate,
            prepared,
            priority=request.priority,
            draft_tokens=len(draft),
        )

    def _draft(self, tokens: tuple[int, ...], budget: int) -> tuple[int, ...]:
        """The part of a request's draft its prefill verifies: up to its first EOS (decoding ends there anyway),
        at most max_draft_tokens and budget - 1 (the token after the draft must fit); none where prefills are
        chunked or pages lazy (a draft is verified in one whole prefill, pages reserved for the whole budget)."""
        cfg = self._config
        if not tokens or cfg.max_draft_tokens <= 0 or cfg.max_step_tokens or cfg.kv_reservation != "full":
            return ()
        eos = set(self._runner.eos_ids)
        vocab = self._runner.decoder.vocab
        # Up to the first EOS, or the first id the embedding does not have (a draft comes from our own interims;
        # an id out of range would fail the whole prefill group on the device).
        end = next((i for i, token in enumerate(tokens) if token in eos or not 0 <= token < vocab), len(tokens))
        return tuple(int(t) for t in tokens[: min(end, cfg.max_draft_tokens, budget - 1)])

    def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            self._close_stream(req.output.item.request)
        self._release(request_id)
        self._scheduler.abort(request_id)

    def _close_stream(self, request: DecodeRequest) -> None:
        """A live utterance's final is done or aborted (the stream ended): its cached encoder windows are freed.
        An aborted interim frees nothing: the session cancels its interim as the utterance closes, and the final
        that follows reuses the windows."""
        if request.stream_key is not None and request.priority is DecodePriority.FINAL:
            key = request.stream_key
            self._runner_call(lambda: self._runner.stream_cache.close(key))

    def _runner_call(self, call: Callable[[], None]) -> None:
        if self._side is None:
            call()
        else:
            self._deferred.append(call)

    def num_waiting(self) -> int:
        return self._scheduler.num_waiting()

    def num_running(self) -> int:
        return self._scheduler.num_running()

    def oldest_waiting_monotonic_s(self) -> float | None:
        return self._scheduler.oldest_waiting_monotonic_s()

    def stats(self) -> CoreStats:
        # Read on another thread: two reads of the page counts the engine thread may change in between, which at
        # worst shows a page as used a step late.
        total = self._kv.usable_pages
        return self._counter.snapshot(kv_pages_used=total - self._kv.num_free, kv_pages_total=total)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._side_pool is not None:
            self._side_pool.shutdown(wait=True, cancel_futures=True)
        self._runner.close()
        if self._trace is not None:
            self._trace.close()

    def step(self) -> list[EngineOutput]:
        outputs: list[EngineOutput] = []
        t0_ns = time.monotonic_ns()
        with torch.inference_mode():
            self._commit_side(outputs)
            now_s = time.monotonic()
            self._runner_call(lambda: self._runner.stream_cache.expire(now_s))
            plan = self._scheduler.schedule(now_s, admit=self._side is None)
            t_plan_ns = time.monotonic_ns()
            for preempted in plan.preempted:
                # Its tokens still on their way are kept: the prefill that readmits it starts from them.
                self._runner.release_row(preempted.row)
                self._runner.drop_prompt(preempted.request_id)
            for growth in plan.grown:
                self._runner.extend_pages(growth.row, growth.start, growth.pages)
            outputs.extend(self._rejected(r) for r in plan.rejected)
            if plan.prefills and self._async_prefill:
                self._start_side(plan.prefills)
            elif plan.prefills:
                self._prefill_isolating_failures(plan.prefills, outputs)
            t_prefill_ns = time.monotonic_ns()
            launched = self._launch_decode(plan)
            t_launch_ns = time.monotonic_ns()
            # Read everything but the step just launched, so the host never waits on it.
            keep = 1 if launched else 0
            while len(self._pending) > keep:
                outputs.extend(self._collect(self._pending.popleft()))
            if self._trace is not None and (plan.prefills or launched or outputs):
                self._trace.write(
                    "step",
                    t=t0_ns,
                    plan_ms=(t_plan_ns - t0_ns) / 1e6,
                    prefill_ms=(t_prefill_ns - t_plan_ns) / 1e6,
                    launch_ms=(t_launch_ns - t_prefill_ns) / 1e6,
                    collect_ms=(time.monotonic_ns() - t_launch_ns) / 1e6,
                    prefills=len(plan.prefills),
                    prefill_tokens=plan.prefill_tokens,
                    rows=len(plan.decodes),
                    waiting=self.num_waiting(),
                    outputs=len(outputs),
                    kv_used=self._kv.usable_pages - self._kv.num_free,
                )
            if not launched and self._side is not None and not outputs:
                # Only the side prefill runs: wait for it (the GIL goes to its thread) instead of spinning.
                wait_futures([self._side.future], timeout=_SIDE_WAIT_S)
            elif not launched and not plan.prefills and self.num_running() and not self._pending:
                # Nothing in flight but requests still marked running: cannot happen; fail them loudly.
                for req in self._scheduler.running():
                    self._finish(req.request_id)
                    outputs.append(EngineOutput(req.request_id, error=RuntimeError("request lost by the engine")))
        self.steps += 1
        return outputs

    # ---- requests leaving ----

    def _release(self, request_id: str) -> None:
        """The request's row goes inactive; its output ignores tokens still on their way."""
        running = self._scheduler.get(request_id)
        if running is not None:
            self._runner.release_row(running.row)
        self._runner_call(lambda: self._runner.drop_prompt(request_id))
        req = self._requests.pop(request_id, None)
        if req is not None:
            req.output.finished = True
            if req.digests is not None:
                req.digests.cancel()

    def _finish(self, request_id: str) -> None:
        self._release(request_id)
        self._scheduler.finish(request_id)

    def _rejected(self, rejected: Rejected) -> EngineOutput:
        self._release(rejected.request_id)
        rid = rejected.request_id
        if rejected.stage == "admission":
            return EngineOutput(rid, error=rejected.error)
        return EngineOutput(rid, error=request_error(rid, rejected.stage, rejected.error))

    # ---- encoder + prefill ----

    def _start_side(self, works: tuple[PrefillWork, ...]) -> None:
        """Hands the admitted prompts to the prefill thread; their rows decode once it is committed."""
        if self._side_pool is None:
            raise RuntimeError("async prefill without its thread")
        now = time.time_ns()
        inputs = []
        for work in works:
            req = self._requests[work.request_id]
            req.output.start_ns = req.output.start_ns or now
            inputs.append(self._prefill_inputs(work, req))
        self.prefill_chunks += len(works)
        after = self._runner.prefill_ordering()
        self._side = _SidePrefill(works, self._side_pool.submit(self._runner.prefill_on_side, inputs, after))

    def _commit_side(self, outputs: list[EngineOutput]) -> None:
        """The side prefill, once its thread is done: the rows of the requests still here start decoding (a
        failed group is prefilled again request by request, in the step, so only the bad one fails)."""
        side = self._side
        if side is None or not side.future.done():
            return
        self._side = None
        try:
            computed = side.future.result()
        except Exception:  # noqa: BLE001 - isolated below; the running requests go on
            logger.exception("prefill of %d requests failed; prefilling them one by one", len(side.works))
            self._runner.wait_side()
            self._run_deferred()
            for work in side.works:
                if self._scheduler.get(work.request_id) is None:
                    continue  # aborted meanwhile
                try:
                    self._prefill((work,))
                except Exception as exc:  # noqa: BLE001 - this request fails alone
                    self._fail_admitted(work.request_id, exc, outputs)
                else:
                    self._scheduler.prefilled(work.request_id)
            return
        # Aborted while it ran: its row and pages are already back (nothing was admitted meanwhile to reuse them).
        keep = [k for k, i in enumerate(computed.done) if computed.inputs[i].work.request_id in self._requests]
        sampled, counts = self._runner.commit(computed, keep)
        done = [self._requests[computed.inputs[computed.done[k]].work.request_id] for k in keep]
        for req in done:
            self._scheduler.prefilled(req.output.request_id)
        self._counter.tokens(len(done))
        if done:
            self._pending.append(self._prefill_pending(sampled, done, counts))
        self._run_deferred()

    def _prefill_pending(self, sampled: Sampled, done: list[_Request], counts: list[int]) -> _Pending:
        """A prefill's tokens on their way to the host: one per finished prompt, k + 1 per drafted one."""
        pending = _Pending(self._runner.to_host(sampled), [])
        at = 0
        for req, count in zip(done, counts, strict=True):
            if count == 1:
                pending.owners.append((at, req.output))
            else:
                pending.drafted.append((at, req.output, req.draft))
            at += count
        return pending

    def _run_deferred(self) -> None:
        calls, self._deferred = self._deferred, []
        for call in calls:
            call()

    def _prefill_isolating_failures(self, works: tuple[PrefillWork, ...], outputs: list[EngineOutput]) -> None:
        """Prefills the group; if that fails, each request again on its own, so only the bad one fails.

        The model runner changes no state before its last stage, so a failed group leaves nothing to undo: its KV
        pages are simply written again.
        """
        now = time.time_ns()
        for work in works:
            output = self._requests[work.request_id].output
            output.start_ns = output.start_ns or now
        self.prefill_chunks += len(works)
        try:
            self._prefill(works)
            return
        except Exception as exc:  # noqa: BLE001 - isolated below; the running requests go on
            if len(works) == 1:
                self._fail_admitted(works[0].request_id, exc, outputs)
                return
            logger.exception("prefill of %d requests failed; prefilling them one by one", len(works))
        for work in works:
            try:
                self._prefill((work,))
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                self._fail_admitted(work.request_id, exc, outputs)

    def _fail_admitted(self, request_id: str, exc: Exception, outputs: list[EngineOutput]) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            self._close_stream(req.output.item.request)
        self._finish(request_id)
        outputs.append(EngineOutput(request_id, error=request_error(request_id, "inference", exc)))

    def _prefill(self, works: tuple[PrefillWork, ...]) -> None:
        reqs = [self._requests[work.request_id] for work in works]
        inputs = [self._prefill_inputs(work, req) for work, req in zip(works, reqs, strict=True)]
        sampled, counts = self._runner.prefill(inputs)
        done = [r for work, r in zip(works, reqs, strict=True) if work.completes]
        self._counter.tokens(len(done))  # a completed prompt yields its first token
        if done:
            self._pending.append(self._prefill_pending(sampled, done, counts))

    @staticmethod
    def _prefill_inputs(work: PrefillWork, req: _Request) -> PrefillInput:
        """The prepared prompt; after a preemption (lazy pages) with the tokens generated so far after it, so the
        prefill recomputes their KV and yields the next token."""
        prepared = req.prepared.future.result()
        generated = work.total_tokens - int(prepared.input_ids.shape[1]) - len(req.draft)
        tokens = req.output.tokens
        if generated and generated != len(tokens):
            raise RuntimeError(f"recompute of {generated} generated tokens, the host has {len(tokens)}")
        request = req.output.item.request
        audio = request.audio_16k if prepared.input_features is None else None
        return PrefillInput(
            work,
            prepared,
            req.output.suppress_eos,
            tuple(tokens) if generated else (),
            audio,
            request.stream_key,
            None if req.digests is None else req.digests.result(),
            req.draft,
        )

    # ---- decode + outputs ----

    def _launch_decode(self, plan: SchedulerOutput) -> bool:
        """One decode step over the bucket that covers every live row; whether one was launched."""
        decodes: list[DecodeWork] = [d for d in plan.decodes if self._runner.is_live(d.row)]
        if not decodes:
            return False
        owners = [(d.row, self._requests[d.request_id].output) for d in decodes]
        rows = self._runner.bucket(max(d.row for d in decodes))
        # An upper bound of each context: a drafted row's accepted length is known on the device only.
        longest = max(
            self._prompt_tokens(out.request_id) + len(self._requests[out.request_id].draft) + len(out.tokens) + 2
            for _, out in owners
        )
        tokens = self._runner.decode(rows, self._runner.max_pages(longest))
        self._counter.step(len(decodes), len(decodes))  # one token per live row
        self._pending.append(_Pending(self._runner.to_host(tokens), owners))
        return True

    def _prompt_tokens(self, request_id: str) -> int:
        running = self._scheduler.get(request_id)
        return running.prompt_tokens if running is not None else 0

    def _collect(self, pending: _Pending) -> list[EngineOutput]:
        values = pending.tokens.values()
        done = self._output.append(pending.owners, values)
        done.extend(self._output.verify(pending.drafted, values))
        if not done:
            return []
        now = time.time_ns()
        batch_size = self._runner.num_live_rows()
        outputs: list[EngineOutput] = []
        for req in done:
            self._close_stream(req.item.request)
            if self._trace is not None:
                self._trace_request(req, now)
            self._finish(req.request_id)
            outputs.append(self._output.result(req, batch_size, now))
        return outputs

    def _trace_request(self, out: RequestOutput, end_ns: int) -> None:
        if self._trace is None:
            return
        entry = self._requests.get(out.request_id)
        request = out.item.request
        self._trace.write(
            "req",
            priority=request.priority.name,
            audio_s=round(request.audio_s, 3),
            stream=request.stream_key is not None,
            enq=out.item.enqueued_ns,
            prepared=entry.prepared_ns if entry is not None else 0,
            start=out.start_ns,
            first=out.first_token_ns,
            end=end_ns,
            tokens=len(out.tokens),
            prompt=self._prompt_tokens(out.request_id),
            encoded_s=round(self._runner.encoded_audio_s.get(out.request_id, -1.0), 3),
            prefilled=self._runner.prefilled_tokens.get(out.request_id, -1),
            draft=len(entry.draft) if entry is not None else 0,
            draft_accepted=out.draft_accepted,
        )
