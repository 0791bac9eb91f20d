"""The continuous engine's scheduler: which requests prefill this step and which rows decode (torch-free).

As vLLM v1's scheduler, it owns the waiting queue, the running set, the decode rows and (through KvPageManager)
the KV pages, and hands the model runner a plain plan per step (`SchedulerOutput`); it imports neither torch nor
numpy, so its tests run in milliseconds.

Admission (`schedule`): waiting requests are taken by priority (a live stream's final first, an interim last), in
arrival order within a priority, while a row and enough pages are free. Pages
for the prompt plus the request's whole token budget (+1: the step launched before the host sees the end) are
reserved at admission, so a running request never runs out and nothing is ever preempted. At most
`max_prefill_tokens` prompt tokens are admitted per step (a first request is always admitted whatever its
length), so running streams keep getting tokens while a burst of long requests is prefilled. While requests are
decoding, newcomers wait until the oldest has waited `prefill_interval_ms` (or enough have arrived to fill every
free row or half a prefill): each prefill has a fixed cost that every running stream pays for.

A request's prompt length is known once its features are computed (on a thread pool, off the engine thread): the
scheduler sees it through a `PromptSource`. A request whose prompt plus budget exceeds the context, or the whole
cache, is refused (`Rejected`).

A request may carry draft tokens (a live final: its utterance's last interim's output): its prefill covers the
prompt and the draft, and the model runner keeps the longest prefix of the draft that greedy decoding agrees with
(found on the device; the host learns it a step later). The scheduler counts the whole draft as computed: an
upper bound of the request's context, which is all it needs (pages are reserved for the whole budget, which the
draft lies within, and a context read larger than the KV written is masked by the real lengths).

A prefill names the token range it covers (`start_token`, `num_tokens`: the whole prompt from 0 under the
default policy), and each request counts the tokens whose K/V its pages hold (`num_computed_tokens`: the prompt,
then one more per scheduled decode).

`kv_reservation="lazy"` (off by default): a request gets pages for its prompt and first decode at admission and
one more page whenever its next decode needs it. When none is free, the most recently admitted running request is
preempted (vLLM's recompute preemption): its row and pages come back, and it goes to the front of the waiting
queue; when it is admitted again, its prefill covers the prompt plus every token it had generated
(`num_computed_tokens` + 1 at preemption: the KV it held plus the last token, whose KV no step had written), so
decoding continues where it stopped. A request preempted in a step is not admitted again in that same step: the
host has not seen its last token yet (tokens reach the host one step late). Requests that could never fit alone
are refused at admission as under reservation.

Chunked prefill (`max_step_tokens` > 0, off by default): every step has a token budget. The rows already
decoding come first, one token each (they are never starved: the budget is checked larger than the rows); what
is left goes to prefill chunks, first of requests whose prompt is partly in their pages (in admission order),
then of newly admitted ones (no prefill interval: a chunk runs beside the decodes every step, so an arrival never
stalls them for a whole prefill round). A request whose last chunk runs in a step also decodes in it (its first
token comes from that chunk), which costs one more token of the budget. A prompt may so span many steps; its pages
are taken at admission as above and filled chunk by chunk (`start_token` moves on), and it is preempted as any
running request (a partly prefilled one starts its prefill again from 0). Which waiting request is admitted next
is `_next_waiting`'s choice (arrival order), the one place an ordering key would go.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from asr_server.config import ContinuousConfig
from asr_server.engine.continuous.kv_manager import KvPageManager
from asr_server.errors import LimitExceeded


class PromptSource(Protocol):
    """A request's prepared inputs, as far as the scheduler needs them."""

    def done(self) -> bool:
        """Whether the prompt is ready (prompt_tokens will not wait)."""
        ...

    def prompt_tokens(self) -> int:
        """The prompt's length in tokens; waits for it; raises what preparing it raised."""
        ...

    def cancel(self) -> None: ...


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class ScheduledRequest:
    """The scheduler's state of one request."""

    request_id: str
    arrival_monotonic_s: float
    # Most tokens the request may generate.
    budget: int
    # A guess of the prompt's length before it is known (for the prefill-interval rule).
    estimated_prompt_tokens: int
    source: PromptSource
    prompt_tokens: int = 0
    row: int = -1
    pages: list[int] = field(default_factory=list)
    # Tokens whose K/V the request's pages hold once the steps scheduled so far have run.
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # Tokens the prefill covers (the prompt, or after a preemption the prompt plus the tokens generated so far);
    # 0 until the prompt is known. The request decodes once num_computed_tokens reaches it.
    prefill_tokens: int = 0
    num_preemptions: int = 0
    # Admission order: the lowest first (engine.types.DecodePriority: a live stream's final before recorded audio
    # before an interim), arrival order within one.
    priority: int = 1
    # Draft tokens prefilled after the prompt and verified there (a live final's last interim); within the budget.
    draft_tokens: int = 0

    @property
    def prefilling(self) -> bool:
        """Running, with part of its prefill still to come (chunked prefill)."""
        return self.status is RequestStatus.RUNNING and self.num_computed_tokens < self.prefill_tokens


@dataclass(frozen=True)
class PrefillWork:
    """Prefill prompt tokens [start_token, start_token + num_tokens) of a request into its pages, on its row; the
    whole prefill is `total_tokens` long (the chunk that reaches it yields the first token and starts decoding)."""

    request_id: str
    row: int
    pages: tuple[int, ...]
    start_token: int
    num_tokens: int
    total_tokens: int

    @property
    def completes(self) -> bool:
        return self.start_token + self.num_tokens >= self.total_tokens


@dataclass(frozen=True)
class DecodeWork:
    request_id: str
    row: int
    # The position this step writes (the tokens in the request's pages before it; an upper bound after a draft).
    position: int


@dataclass(frozen=True)
class Rejected:
    """A request refused before it ran: stage "preprocessing" (its features failed) or "admission" (too large)."""

    request_id: str
    stage: str
    error: Exception


@dataclass(frozen=True)
class PageGrowth:
    """Lazy policy: pages appended to a running request's block-table row, from index `start`."""

    request_id: str
    row: int
    start: int
    pages: tuple[int, ...]


@dataclass(frozen=True)
class Preempted:
    """A request sent back to waiting (lazy policy): its row is free; its next prefill covers `prefill_tokens`."""

    request_id: str
    row: int
    prefill_tokens: int


@dataclass(frozen=True)
class SchedulerOutput:
    prefills: tuple[PrefillWork, ...] = ()
    # Every row that decodes this step, the ones prefilled just before included; by row.
    decodes: tuple[DecodeWork, ...] = ()
    rejected: tuple[Rejected, ...] = ()
    # Preempted this step (lazy policy only), before anything was admitted: release their rows first.
    preempted: tuple[Preempted, ...] = ()
    # Lazy policy: pages running requests got this step (write them into their rows before decoding).
    grown: tuple[PageGrowth, ...] = ()

    @property
    def prefill_tokens(self) -> int:
        return sum(p.num_tokens for p in self.prefills)

    @property
    def num_tokens(self) -> int:
        """The step's tokens: prefill chunks plus one per decode row (what max_step_tokens bounds)."""
        return self.prefill_tokens + len(self.decodes)


class Scheduler:
    def __init__(self, config: ContinuousConfig, kv: KvPageManager, *, deferred_prefill: bool = False) -> None:
        if kv.page_size != config.page_size:
            raise ValueError(f"page sizes differ: config {config.page_size}, KV manager {kv.page_size}")
        self._config = config
        self.kv = kv
        # The block table's width: the most pages one request may hold.
        self.max_pages_per_request = -(-config.max_context_tokens // config.page_size)
        self.max_context_tokens = self.max_pages_per_request * config.page_size
        self.num_rows = config.max_running
        if config.kv_reservation not in ("full", "lazy"):
            raise ValueError(f"kv_reservation must be full or lazy, not {config.kv_reservation!r}")
        self._lazy = config.kv_reservation == "lazy"
        # Whole prompts prefilled beside the decode steps (the engine's async prefill): an admitted request
        # decodes only once the engine reports its prefill in (`prefilled`), never in the step that admitted it.
        self._deferred = deferred_prefill
        if deferred_prefill and (self._lazy or config.max_step_tokens):
            raise ValueError("a deferred (async) prefill needs whole prompts and full page reservation")
        self._step_tokens = config.max_step_tokens
        if self._step_tokens and self._step_tokens <= self.num_rows:
            raise ValueError(
                f"max_step_tokens ({self._step_tokens}) must exceed max_running ({self.num_rows}), so that prefill "
                "chunks always get part of a step beside a full decode batch"
            )
        self._free_rows: list[int] = list(range(self.num_rows - 1, -1, -1))
        self._waiting: deque[ScheduledRequest] = deque()
        self._running: dict[str, ScheduledRequest] = {}

    # ---- queue state ----

    def add(
        self,
        request_id: str,
        arrival_monotonic_s: float,
        budget: int,
        estimated_prompt_tokens: int,
        source: PromptSource,
        priority: int = 1,
        draft_tokens: int = 0,
    ) -> ScheduledRequest:
        """`draft_tokens` (full page reservation, no chunked prefill only: a draft is verified in a whole
        prefill) are prefilled after the prompt; at most budget - 1 of them."""
        if draft_tokens and (self._lazy or self._step_tokens or draft_tokens >= max(1, budget)):
            raise ValueError(f"{draft_tokens} draft tokens need full reservation, whole prefills and a larger budget")
        request = ScheduledRequest(
            request_id,
            arrival_monotonic_s,
            max(1, budget),
            estimated_prompt_tokens,
            source,
            priority=priority,
            draft_tokens=draft_tokens,
        )
        # Behind every waiting request of the same or a more urgent priority (preempted ones, back in front, stay
        # ahead of their own priority and later ones).
        at = len(self._waiting)
        while at > 0 and self._waiting[at - 1].priority > priority:
            at -= 1
        self._waiting.insert(at, request)
        return request

    def num_waiting(self) -> int:
        return len(self._waiting)

    def num_running(self) -> int:
        return len(self._running)

    def oldest_waiting_monotonic_s(self) -> float | None:
        # Not the front's: a final that just arrived goes ahead of interims that have waited longer.
        return min((r.arrival_monotonic_s for r in self._waiting), default=None)

    def free_rows(self) -> list[int]:
        return list(self._free_rows)

    def get(self, request_id: str) -> ScheduledRequest | None:
        return self._running.get(request_id)

    def running(self) -> list[ScheduledRequest]:
        return list(self._running.values())

    # ---- leaving ----

    def abort(self, request_id: str) -> bool:
        """Drops a waiting or running request (its row and pages come back); whether there was one."""
        found = False
        for request in [r for r in self._waiting if r.request_id == request_id]:
            self._waiting.remove(request)
            request.source.cancel()
            request.status = RequestStatus.FINISHED
            found = True
        return self.finish(request_id) or found

    def finish(self, request_id: str) -> bool:
        """A request is done (or failed): its row and pages come back; whether it was running (or, preempted,
        waiting to run again)."""
        request = self._running.pop(request_id, None)
        if request is None:
            return self._drop_preempted(request_id)
        request.status = RequestStatus.FINISHED
        if request.pages:
            self.kv.free(request.pages)
            request.pages = []
        if request.row >= 0:
            self._free_rows.append(request.row)
            # Lowest rows first keeps the running rows packed at the start, so the decode bucket stays small.
            self._free_rows.sort(reverse=True)
            request.row = -1
        return True

    def _drop_preempted(self, request_id: str) -> bool:
        """A preempted request that finished with the tokens already on their way leaves the waiting queue."""
        for request in [r for r in self._waiting if r.request_id == request_id and r.num_preemptions]:
            self._waiting.remove(request)
            request.status = RequestStatus.FINISHED
            return True
        return False

    # ---- one step ----

    def prefilled(self, request_id: str) -> None:
        """Deferred prefill: the request's prompt is in its pages; it decodes from the next plan on."""
        request = self._running.get(request_id)
        if request is not None:
            request.num_computed_tokens = request.prefill_tokens

    def schedule(self, now_monotonic_s: float, *, admit: bool = True) -> SchedulerOutput:
        """This step's plan: the prefills of newly admitted requests (none when `admit` is false: the engine's
        async prefill still running), then one decode for every running row."""
        preempted: list[Preempted] = []
        grown: list[PageGrowth] = []
        if self._lazy:
            preempted, grown = self._grow_running()
        prefills: list[PrefillWork] = []
        rejected: list[Rejected] = []
        if self._step_tokens:
            prefills, rejected = self._chunks(bool(preempted))
        elif not preempted and admit:
            prefills, rejected = self._admit(now_monotonic_s)
        decodes = []
        for request in sorted(self._running.values(), key=lambda r: r.row):
            if request.prefilling:
                continue
            decodes.append(DecodeWork(request.request_id, request.row, request.num_computed_tokens))
            request.num_computed_tokens += 1
        return SchedulerOutput(tuple(prefills), tuple(decodes), tuple(rejected), tuple(preempted), tuple(grown))

    def _chunks(self, preempted_now: bool) -> tuple[list[PrefillWork], list[Rejected]]:
        """Chunked prefill: this step's prefill chunks within what the decoding rows leave of the budget."""
        left = self._step_tokens - sum(1 for r in self._running.values() if not r.prefilling)
        prefills: list[PrefillWork] = []
        rejected: list[Rejected] = []
        for request in list(self._running.values()):  # admission order: the oldest partial prompt first
            if left <= 0:
                break
            if request.prefilling:
                left -= self._chunk(request, left, prefills)
        # Newcomers get what the partial prompts left (none when one is left over); none in a step that preempted.
        while left > 0 and not preempted_now and self._free_rows and self._waiting:
            newcomer = self._next_waiting(wait_for_prompt=not prefills and not self._running)
            if newcomer is None:
                break
            admitted = self._take(newcomer, rejected)
            if admitted is None:
                continue
            if not admitted:
                break
            cost = self._chunk(newcomer, left, prefills)
            if cost == 0:
                break  # no room for even its first token: it starts next step; admit nobody else meanwhile
            left -= cost
        return prefills, rejected

    def _chunk(self, request: ScheduledRequest, left: int, prefills: list[PrefillWork]) -> int:
        """Schedules the next chunk of a running request's prefill within `left` tokens; the tokens it costs (its
        first decode, in the step its prefill completes, included)."""
        remaining = request.prefill_tokens - request.num_computed_tokens
        size = remaining if remaining + 1 <= left else min(remaining - 1, left)
        if size <= 0:
            return 0
        start = request.num_computed_tokens
        prefills.append(
            PrefillWork(request.request_id, request.row, tuple(request.pages), start, size, request.prefill_tokens)
        )
        request.num_computed_tokens += size
        return size + (1 if size == remaining else 0)

    def _next_waiting(self, *, wait_for_prompt: bool) -> ScheduledRequest | None:
        """The waiting request to admit next (arrival order; preempted ones were put in front), taken off the
        queue; None when it is not ready and `wait_for_prompt` is false (features are computed in arrival order:
        a later one being ready first is rare and cheap to wait for)."""
        if not self._waiting:
            return None
        if not wait_for_prompt and not self._waiting[0].source.done():
            return None
        return self._waiting.popleft()

    def _prefill_of(self, request: ScheduledRequest, rejected: list[Rejected]) -> int | None:
        """The tokens a request taken off the queue must prefill (its prompt, waited for if need be, or what a
        preemption left); None when it is refused (added to `rejected`)."""
        if request.num_preemptions:
            return request.prefill_tokens  # known, and checked at its first admission
        try:
            prompt = request.source.prompt_tokens()  # waits when nothing else can run meanwhile
        except Exception as exc:  # noqa: BLE001 - one bad clip fails alone
            request.status = RequestStatus.FINISHED
            rejected.append(Rejected(request.request_id, "preprocessing", exc))
            return None
        refusal = self._refusal(prompt, request.budget)
        if refusal is not None:
            request.status = RequestStatus.FINISHED
            rejected.append(Rejected(request.request_id, "admission", refusal))
            return None
        request.prompt_tokens = prompt
        request.prefill_tokens = prompt + request.draft_tokens
        return request.prefill_tokens

    def _take(self, request: ScheduledRequest, rejected: list[Rejected]) -> bool | None:
        """Admits `request` (taken off the queue): its prompt length, a row and its pages. True: running;
        None: refused (in `rejected`); False: no pages now (back to the front of the queue)."""
        tokens = self._prefill_of(request, rejected)
        if tokens is None:
            return None
        need_pages = self._admission_pages(request, tokens)
        if not self.kv.can_allocate(need_pages):
            self._waiting.appendleft(request)
            return False
        self._run(request, need_pages, num_computed_tokens=0)
        return True

    def _admission_pages(self, request: ScheduledRequest, tokens: int) -> int:
        # Lazy: the prefill and the first decode; full: the prompt and every token the budget allows (+1: the
        # step launched before the host sees the end); a draft lies within the budget.
        if self._lazy:
            return self.kv.pages_for(tokens + 1)
        return self.kv.pages_for(tokens - request.draft_tokens + request.budget + 1)

    def _run(self, request: ScheduledRequest, pages: int, *, num_computed_tokens: int) -> None:
        request.pages = self.kv.allocate(pages)
        request.row = self._free_rows.pop()
        request.num_computed_tokens = num_computed_tokens
        request.status = RequestStatus.RUNNING
        self._running[request.request_id] = request

    def _grow_running(self) -> tuple[list[Preempted], list[PageGrowth]]:
        """Lazy policy: a page more for every running request whose next decode needs one, in admission order;
        when none is free, the most recently admitted request gives its pages back (preemption by recompute)."""
        preempted: list[Preempted] = []
        grown: list[PageGrowth] = []
        order = list(self._running.values())  # admission order
        for request in order:
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted just now for an earlier one
            need = min(self.kv.pages_for(request.num_computed_tokens + 1), self.max_pages_per_request)
            start = len(request.pages)
            while len(request.pages) < need:
                if self.kv.can_allocate(1):
                    request.pages.extend(self.kv.allocate(1))
                    continue
                victim = next(r for r in reversed(order) if r.status is RequestStatus.RUNNING)
                preempted.append(self._preempt(victim))
                if victim is request:
                    break
            if request.status is RequestStatus.RUNNING and len(request.pages) > start:
                grown.append(PageGrowth(request.request_id, request.row, start, tuple(request.pages[start:])))
        # Victims are the latest admitted still running, never one already grown: `grown` needs no filtering.
        return preempted, grown

    def _preempt(self, request: ScheduledRequest) -> Preempted:
        row = request.row
        self.finish(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        if request.num_computed_tokens >= request.prefill_tokens:
            # Its KV (the prompt and the decoded tokens) plus the last token generated, whose KV no step wrote.
            request.prefill_tokens = request.num_computed_tokens + 1
        # (Preempted mid-prefill, chunked: the same prefill again from its start.)
        request.num_computed_tokens = 0
        # To the front of the queue; victims go latest admitted first, so the earliest admitted ends up in front.
        self._waiting.appendleft(request)
        return Preempted(request.request_id, row, request.prefill_tokens)

    def _admit_now(self, now_monotonic_s: float) -> bool:
        if not self._waiting or not self._free_rows:
            return False
        if not self._running:
            return True
        oldest = self.oldest_waiting_monotonic_s()
        oldest_ms = (now_monotonic_s - (oldest if oldest is not None else now_monotonic_s)) * 1000
        if oldest_ms >= self._config.prefill_interval_ms:
            return True
        # Enough arrived to take every free row (or to make a full prefill anyway): no reason to wait.
        if len(self._waiting) >= len(self._free_rows):
            return True
        ready_tokens = sum(r.estimated_prompt_tokens for r in self._waiting)
        return ready_tokens >= self._config.max_prefill_tokens // 2

    def _admit(self, now_monotonic_s: float) -> tuple[list[PrefillWork], list[Rejected]]:
        prefills: list[PrefillWork] = []
        rejected: list[Rejected] = []
        if not self._admit_now(now_monotonic_s):
            return prefills, rejected
        prompt_tokens = 0
        while self._waiting and self._free_rows:
            request = self._next_waiting(wait_for_prompt=not prefills and not self._running)
            if request is None:
                break
            tokens = self._prefill_of(request, rejected)
            if tokens is None:
                continue
            need_pages = self._admission_pages(request, tokens)
            over_prefill = bool(prefills) and prompt_tokens + tokens > self._config.max_prefill_tokens
            if not self.kv.can_allocate(need_pages) or over_prefill:
                self._waiting.appendleft(request)
                break
            self._run(request, need_pages, num_computed_tokens=0 if self._deferred else tokens)
            prompt_tokens += tokens
            prefills.append(PrefillWork(request.request_id, request.row, tuple(request.pages), 0, tokens, tokens))
        return prefills, rejected

    def _refusal(self, prompt: int, budget: int) -> LimitExceeded | None:
        need_tokens = prompt + budget + 1  # +1: the step launched before the host sees the end
        if need_tokens > self.max_context_tokens:
            return LimitExceeded(
                f"prompt ({prompt} tokens) plus max_new_tokens ({budget}) exceeds the engine's "
                f"context of {self.max_context_tokens} tokens; send shorter chunks or fewer tokens"
            )
        if self.kv.pages_for(need_tokens) > self.kv.usable_pages:
            return LimitExceeded(
                f"request needs {need_tokens} KV tokens, the cache holds {self.kv.usable_pages * self.kv.page_size}"
            )
        return None
