"""The continuous engine's scheduler on its own (pure, no torch, no model): admission by rows, pages and the prefill
budget, refusals, the prefill-interval rule, aborts, and page accounting under random traffic."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from asr_server.config import ContinuousConfig
from asr_server.engine.continuous.kv_manager import KvPageManager
from asr_server.engine.continuous.scheduler import RequestStatus, Scheduler, SchedulerOutput
from asr_server.errors import LimitExceeded

PAGE = 16


class FakeSource:
    """A PromptSource whose prompt is ready (or not, or failed) as the test says."""

    def __init__(self, prompt: int, *, ready: bool = True, error: Exception | None = None) -> None:
        self.prompt = prompt
        self.ready = ready
        self.error = error
        self.cancelled = False
        self.waited = False

    def done(self) -> bool:
        return self.ready

    def prompt_tokens(self) -> int:
        self.waited = not self.ready
        if self.error is not None:
            raise self.error
        return self.prompt

    def cancel(self) -> None:
        self.cancelled = True


def _scheduler(rows: int = 4, pages: int = 64, **config: float) -> Scheduler:
    settings = {"max_running": rows, "page_size": PAGE, "max_context_tokens": 256, **config}
    return Scheduler(ContinuousConfig(**settings), KvPageManager(pages, PAGE))  # type: ignore[arg-type]


def _add(s: Scheduler, rid: str, prompt: int, budget: int, t: float = 0.0, **source: object) -> FakeSource:
    src = FakeSource(prompt, **source)  # type: ignore[arg-type]
    s.add(rid, t, budget, prompt, src)
    return src


def _ids(plan: SchedulerOutput) -> list[str]:
    return [p.request_id for p in plan.prefills]


def test_admission_reserves_prompt_plus_budget_plus_one_and_every_running_row_decodes() -> None:
    s = _scheduler()
    _add(s, "a", prompt=20, budget=11)  # 32 tokens: 2 pages
    _add(s, "b", prompt=20, budget=12)  # 33 tokens: 3 pages
    plan = s.schedule(0.0)
    assert _ids(plan) == ["a", "b"]
    assert [len(p.pages) for p in plan.prefills] == [2, 3]
    assert [(p.start_token, p.num_tokens) for p in plan.prefills] == [(0, 20), (0, 20)]
    assert [p.row for p in plan.prefills] == [0, 1]
    assert [(d.request_id, d.row, d.position) for d in plan.decodes] == [("a", 0, 20), ("b", 1, 20)]
    assert plan.preempted == ()
    # Next step: no prefill, the same rows decode one position further.
    plan = s.schedule(0.0)
    assert plan.prefills == () and [d.position for d in plan.decodes] == [21, 21]
    assert s.kv.num_free == 63 - 5


def test_admission_stops_at_free_rows() -> None:
    s = _scheduler(rows=2)
    for i in range(3):
        _add(s, f"r{i}", prompt=10, budget=5)
    assert _ids(s.schedule(0.0)) == ["r0", "r1"]
    assert s.num_waiting() == 1 and s.num_running() == 2 and s.free_rows() == []
    s.finish("r0")
    assert _ids(s.schedule(1.0)) == ["r2"]
    assert [d.row for d in s.schedule(1.0).decodes] == [0, 1]  # r2 took the freed row 0


def test_admission_waits_for_pages_in_arrival_order() -> None:
    s = _scheduler(pages=7)  # 6 usable pages
    _add(s, "a", prompt=30, budget=33)  # 64 tokens: 4 pages
    _add(s, "b", prompt=30, budget=33)  # 4 pages: not free yet
    _add(s, "c", prompt=5, budget=5)  # would fit, but stays behind b
    assert _ids(s.schedule(0.0)) == ["a"]
    assert s.num_waiting() == 2
    s.finish("a")
    assert _ids(s.schedule(1.0)) == ["b", "c"]
    assert s.kv.num_free == 6 - 4 - 1


def test_the_prefill_token_budget_splits_a_burst_over_steps_but_never_refuses_one_long_prompt() -> None:
    s = _scheduler(rows=8, max_prefill_tokens=50)
    _add(s, "long", prompt=120, budget=4)
    _add(s, "x", prompt=30, budget=4)
    _add(s, "y", prompt=30, budget=4)
    _add(s, "z", prompt=30, budget=4)
    assert _ids(s.schedule(0.0)) == ["long"]  # alone over the budget: admitted on its own
    assert _ids(s.schedule(1.0)) == ["x"]  # 30 + 30 > 50
    plan = s.schedule(2.0)
    assert _ids(plan) == ["y"] and plan.prefill_tokens == 30
    assert _ids(s.schedule(3.0)) == ["z"]


def test_over_long_requests_are_refused_and_the_next_one_admitted() -> None:
    s = _scheduler(pages=8)  # 7 usable pages: 112 tokens; context 256
    _add(s, "ctx", prompt=200, budget=56)  # 257 > 256 context
    _add(s, "cache", prompt=100, budget=20)  # 121 tokens > 112 the cache holds
    _add(s, "fits", prompt=100, budget=11)  # 112: exactly the cache
    plan = s.schedule(0.0)
    assert [(r.request_id, r.stage) for r in plan.rejected] == [("ctx", "admission"), ("cache", "admission")]
    assert all(isinstance(r.error, LimitExceeded) for r in plan.rejected)
    assert "exceeds the engine's context of 256 tokens" in str(plan.rejected[0].error)
    assert "the cache holds 112" in str(plan.rejected[1].error)
    assert _ids(plan) == ["fits"] and s.kv.num_free == 0


def test_a_failed_preprocessing_is_rejected_alone() -> None:
    s = _scheduler()
    _add(s, "bad", prompt=10, budget=4, error=ValueError("not finite"))
    _add(s, "good", prompt=10, budget=4)
    plan = s.schedule(0.0)
    assert [(r.request_id, r.stage, str(r.error)) for r in plan.rejected] == [("bad", "preprocessing", "not finite")]
    assert _ids(plan) == ["good"]


def test_with_nothing_running_the_first_prompt_is_waited_for_later_ones_are_not() -> None:
    s = _scheduler()
    first = _add(s, "a", prompt=10, budget=4, ready=False)
    second = _add(s, "b", prompt=10, budget=4, ready=False)
    assert _ids(s.schedule(0.0)) == ["a"]  # nothing else could run: waits for a's features
    assert first.waited and not second.waited and s.num_waiting() == 1
    second.ready = True
    assert _ids(s.schedule(1.0)) == ["b"]


def test_while_decoding_newcomers_wait_for_the_prefill_interval() -> None:
    s = _scheduler(rows=8, prefill_interval_ms=12.0, max_prefill_tokens=1000)
    _add(s, "running", prompt=10, budget=50)
    assert _ids(s.schedule(0.0)) == ["running"]
    _add(s, "late", prompt=10, budget=4, t=1.0)
    assert _ids(s.schedule(1.005)) == []  # 5 ms: wait for company
    assert s.oldest_waiting_monotonic_s() == 1.0
    assert _ids(s.schedule(1.012)) == ["late"]


def test_the_interval_is_skipped_when_the_waiting_fill_every_free_row_or_half_a_prefill() -> None:
    rows = _scheduler(rows=3, prefill_interval_ms=1000.0)
    _add(rows, "running", prompt=10, budget=50)
    rows.schedule(0.0)
    _add(rows, "a", prompt=10, budget=4)
    assert _ids(rows.schedule(0.0)) == []
    _add(rows, "b", prompt=10, budget=4)  # 2 waiting, 2 free rows
    assert _ids(rows.schedule(0.0)) == ["a", "b"]

    tokens = _scheduler(rows=8, prefill_interval_ms=1000.0, max_prefill_tokens=100)
    _add(tokens, "running", prompt=10, budget=50)
    tokens.schedule(0.0)
    _add(tokens, "a", prompt=30, budget=4)
    assert _ids(tokens.schedule(0.0)) == []
    _add(tokens, "b", prompt=20, budget=4)  # 50 estimated tokens: half of max_prefill_tokens
    assert _ids(tokens.schedule(0.0)) == ["a", "b"]


def test_aborts_while_waiting_and_running_give_rows_and_pages_back() -> None:
    s = _scheduler(rows=1, pages=16)
    _add(s, "run", prompt=20, budget=20)
    waiting = _add(s, "wait", prompt=20, budget=20)
    s.schedule(0.0)
    assert s.abort("wait") and waiting.cancelled and s.num_waiting() == 0
    assert s.kv.num_free == 15 - 3
    assert s.abort("run")
    assert s.num_running() == 0 and s.kv.num_free == 15 and s.free_rows() == [0]
    assert not s.abort("run") and not s.finish("run")
    assert s.schedule(1.0) == SchedulerOutput()


def test_finished_rows_are_reused_lowest_first() -> None:
    s = _scheduler(rows=4)
    for i in range(4):
        _add(s, f"r{i}", prompt=8, budget=4)
    s.schedule(0.0)
    s.finish("r3")
    s.finish("r1")
    assert s.free_rows() == [3, 1]  # popped from the end: row 1 next
    _add(s, "n", prompt=8, budget=4)
    (work,) = s.schedule(1.0).prefills
    assert work.row == 1 and s.get("n") is not None and s.get("n").status is RequestStatus.RUNNING  # type: ignore[union-attr]


def test_random_arrivals_finishes_and_aborts_lose_no_page_and_no_row() -> None:
    rng = random.Random(11)
    s = _scheduler(rows=6, pages=40, max_prefill_tokens=80, prefill_interval_ms=3.0)
    now = 0.0
    next_id = 0
    for _ in range(3000):
        now += rng.random() * 0.004
        for _ in range(rng.randint(0, 2)):
            _add(s, f"r{next_id}", prompt=rng.randint(1, 150), budget=rng.randint(1, 120), t=now)
            next_id += 1
        plan = s.schedule(now)
        running = s.running()
        if running and rng.random() < 0.3:
            s.finish(rng.choice(running).request_id)
        if rng.random() < 0.1:
            s.abort(f"r{rng.randrange(max(1, next_id))}")
        owned = [p for r in s.running() for p in r.pages]
        free = s.kv.free_pages()
        assert 0 not in owned and 0 not in free
        assert len(set(owned)) == len(owned) and not set(owned) & set(free)
        assert sorted(owned + free) == list(range(1, 40))
        assert all(s.kv.refcount(p) == 1 for p in owned)
        rows = [r.row for r in s.running()]
        assert sorted(rows + s.free_rows()) == list(range(6))
        assert all(r.prompt_tokens + r.budget + 1 <= len(r.pages) * PAGE for r in s.running())
        assert all(p.num_tokens <= 256 for p in plan.prefills)
    for r in s.running():
        s.finish(r.request_id)
    assert s.kv.num_free == 39 and len(s.free_rows()) == 6


def test_the_scheduler_and_page_manager_import_neither_torch_nor_numpy() -> None:
    """Read from the source: the modules' top-level imports, followed through the package, reach no torch."""
    root = Path(__file__).resolve().parents[2] / "server"
    todo = ["asr_server.engine.continuous.scheduler", "asr_server.engine.continuous.kv_manager"]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = root / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = root / name.replace(".", "/") / "__init__.py"
        for node in ast.parse(path.read_text()).body:  # top level only: a lazy import inside a function is fine
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for imported in names:
                assert imported.split(".")[0] not in ("torch", "numpy"), f"{name} imports {imported}"
                if imported.startswith("asr_server.") or imported == "asr_server":
                    todo.append(imported)
    assert "asr_server.config" in seen


@pytest.mark.parametrize("page_size", [8, 32])
def test_a_kv_manager_of_another_page_size_is_refused(page_size: int) -> None:
    with pytest.raises(ValueError, match="page sizes differ"):
        Scheduler(ContinuousConfig(page_size=16), KvPageManager(8, page_size))


# ---- lazy page growth, preemption by recompute ----


def _lazy(rows: int = 4, pages: int = 64, **config: float) -> Scheduler:
    return _scheduler(rows=rows, pages=pages, kv_reservation="lazy", **config)  # type: ignore[arg-type]


def test_lazy_admission_takes_pages_for_the_prompt_and_first_decode_and_grows_a_page_at_a_time() -> None:
    s = _lazy()
    _add(s, "a", prompt=15, budget=100)  # 16 tokens: 1 page; the budget reserves nothing
    plan = s.schedule(0.0)
    assert [len(p.pages) for p in plan.prefills] == [1] and plan.grown == ()
    assert [d.position for d in plan.decodes] == [15]  # the 16th slot: still page 0 of the request
    plan = s.schedule(0.0)  # position 16 needs a second page
    ((growth,),) = [plan.grown]
    assert (growth.request_id, growth.row, growth.start, len(growth.pages)) == ("a", 0, 1, 1)
    assert s.get("a").pages[1:] == list(growth.pages)  # type: ignore[union-attr]
    for _ in range(15):
        assert s.schedule(0.0).grown == ()  # positions 17..31 fit the second page
    assert len(s.schedule(0.0).grown) == 1


def test_when_pages_run_out_the_latest_admitted_is_preempted_and_recomputed_from_its_tokens() -> None:
    s = _lazy(rows=4, pages=6)  # 5 usable pages
    _add(s, "old", prompt=15, budget=60)
    _add(s, "new", prompt=15, budget=60)
    assert _ids(s.schedule(0.0)) == ["old", "new"]  # 1 page each; 3 free
    assert len(s.schedule(0.0).grown) == 2  # both grow to 2 pages; 1 free
    for _ in range(15):
        assert s.schedule(0.0).preempted == ()
    plan = s.schedule(0.0)  # both need a third page: "old" takes the last, "new" gives its pages back
    ((victim,),) = [plan.preempted]
    assert (victim.request_id, victim.row) == ("new", 1)
    # Its KV held the prompt and 17 decoded tokens; the prefill covers those plus the last generated token.
    assert victim.prefill_tokens == 15 + 17 + 1
    assert [g.request_id for g in plan.grown] == ["old"] and [d.request_id for d in plan.decodes] == ["old"]
    assert plan.prefills == ()  # not readmitted in the step that preempted it
    assert s.num_waiting() == 1 and s.oldest_waiting_monotonic_s() == 0.0
    assert len(s.get("old").pages) == 3 and s.kv.num_free == 2  # type: ignore[union-attr]
    s.finish("old")
    plan = s.schedule(1.0)
    ((work,),) = [plan.prefills]
    assert (work.request_id, work.start_token, work.num_tokens, len(work.pages)) == ("new", 0, 33, 3)
    assert [d.position for d in plan.decodes] == [33]


def test_the_latest_admitted_preempts_itself_and_waits_until_pages_are_free() -> None:
    s = _lazy(rows=2, pages=4)  # 3 usable pages
    _add(s, "a", prompt=30, budget=17)  # 48 tokens at most: 3 pages when alone
    _add(s, "b", prompt=15, budget=4)
    assert _ids(s.schedule(0.0)) == ["a", "b"]  # 2 + 1 pages, none free
    plan = s.schedule(0.0)  # b's position 16 needs a page: b is the latest admitted, so it gives its own back
    assert [p.request_id for p in plan.preempted] == ["b"] and [d.request_id for d in plan.decodes] == ["a"]
    assert s.kv.num_free == 1
    plan = s.schedule(1.0)  # a's position 32 takes the free page; b (2 pages for 17 + 1 tokens) still waits
    assert [g.request_id for g in plan.grown] == ["a"] and plan.prefills == () and s.kv.num_free == 0
    s.finish("a")
    ((work,),) = [s.schedule(2.0).prefills]
    assert (work.request_id, work.num_tokens, len(work.pages)) == ("b", 15 + 1 + 1, 2)


def test_a_preempted_request_that_finishes_with_its_last_tokens_leaves_the_queue() -> None:
    s = _lazy(rows=2, pages=4)
    _add(s, "a", prompt=15, budget=20)
    _add(s, "b", prompt=15, budget=20)
    s.schedule(0.0)
    assert [p.request_id for p in s.schedule(0.0).preempted] == ["b"]
    assert s.finish("b") and s.num_waiting() == 0
    assert not s.finish("b")


def test_lazy_random_traffic_keeps_page_accounting_exact() -> None:
    rng = random.Random(5)
    s = _lazy(rows=5, pages=24, max_prefill_tokens=200, prefill_interval_ms=2.0)
    now = 0.0
    next_id = 0
    preemptions = 0
    for _ in range(4000):
        now += rng.random() * 0.003
        if rng.random() < 0.3:
            _add(s, f"r{next_id}", prompt=rng.randint(1, 100), budget=rng.randint(1, 150), t=now)
            next_id += 1
        plan = s.schedule(now)
        preemptions += len(plan.preempted)
        # Every decode this step has its slot in the request's pages.
        assert all(d.position < len(s.get(d.request_id).pages) * PAGE for d in plan.decodes)  # type: ignore[union-attr]
        running = s.running()
        if running and rng.random() < 0.05:
            s.finish(rng.choice(running).request_id)  # EOS, or an abort
        for r in s.running():
            if r.num_computed_tokens - r.prompt_tokens > r.budget:  # the host saw the budget's last token
                s.finish(r.request_id)
        owned = [p for r in s.running() for p in r.pages]
        free = s.kv.free_pages()
        assert 0 not in owned and 0 not in free and len(set(owned)) == len(owned)
        assert sorted(owned + free) == list(range(1, 24))
        assert sorted([r.row for r in s.running()] + s.free_rows()) == list(range(5))
    assert preemptions > 0


# ---- chunked prefill (max_step_tokens) ----


def _chunked(rows: int = 4, pages: int = 64, budget: int = 24, **config: object) -> Scheduler:
    return _scheduler(rows=rows, pages=pages, max_step_tokens=budget, **config)  # type: ignore[arg-type]


def _chunks(plan: SchedulerOutput) -> list[tuple[str, int, int, int]]:
    return [(p.request_id, p.start_token, p.num_tokens, p.total_tokens) for p in plan.prefills]


def test_a_long_prompt_is_prefilled_in_chunks_beside_the_running_decodes() -> None:
    s = _chunked(budget=24, max_context_tokens=512, prefill_interval_ms=1000.0)
    _add(s, "a", prompt=10, budget=100)
    _add(s, "b", prompt=10, budget=100)
    plan = s.schedule(0.0)  # both fit whole: 10 + 1 (its first decode) each
    assert _chunks(plan) == [("a", 0, 10, 10), ("b", 0, 10, 10)] and plan.num_tokens == 22
    assert [d.position for d in plan.decodes] == [10, 10]
    _add(s, "long", prompt=100, budget=4, t=0.0)
    # 2 decodes first; the long prompt gets the other 22 tokens of every step, with no prefill interval to wait.
    seen = 0
    for step in range(5):
        plan = s.schedule(0.001)
        assert plan.num_tokens <= 24
        assert [d.request_id for d in plan.decodes][:2] == ["a", "b"]  # never starved
        ((rid, start, size, total),) = _chunks(plan)
        assert (rid, start, total) == ("long", seen, 100)
        seen += size
        if seen < 100:
            assert size == 22 and "long" not in [d.request_id for d in plan.decodes]
        else:
            # The last chunk (12 tokens) completes the prompt; its first decode runs in the same step.
            assert step == 4 and size == 12 and plan.prefills[0].completes
            assert [(d.request_id, d.position) for d in plan.decodes][-1] == ("long", 100)
    assert seen == 100
    plan = s.schedule(0.002)
    assert plan.prefills == () and [d.request_id for d in plan.decodes] == ["a", "b", "long"]


def test_chunked_admission_needs_no_interval_and_newcomers_get_what_a_partial_prompt_leaves() -> None:
    s = _chunked(rows=4, budget=20, prefill_interval_ms=1000.0)
    _add(s, "run", prompt=5, budget=50)
    s.schedule(0.0)
    _add(s, "p", prompt=30, budget=4, t=1.0)
    _add(s, "q", prompt=5, budget=4, t=1.0)
    plan = s.schedule(1.0)  # 1 decode; p takes 19 and leaves nothing: q waits
    assert _chunks(plan) == [("p", 0, 19, 30)] and s.num_waiting() == 1
    plan = s.schedule(1.0)  # p's last 11 (+1 decode), then q whole (5 + 1): 1 + 12 + 6 = 19
    assert _chunks(plan) == [("p", 19, 11, 30), ("q", 0, 5, 5)]
    assert [d.request_id for d in plan.decodes] == ["run", "p", "q"] and plan.num_tokens == 19


def test_a_chunk_never_completes_a_prompt_without_room_for_its_first_decode() -> None:
    s = _chunked(rows=4, budget=10)
    _add(s, "a", prompt=10, budget=4)
    plan = s.schedule(0.0)  # 10 tokens would complete it, with its decode 11 > 10: 9 now, 1 next step
    assert _chunks(plan) == [("a", 0, 9, 10)] and plan.decodes == ()
    plan = s.schedule(0.0)
    assert _chunks(plan) == [("a", 9, 1, 10)] and [d.position for d in plan.decodes] == [10]


def test_a_step_budget_not_above_the_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="must exceed max_running"):
        _chunked(rows=4, budget=4)


def test_chunked_lazy_preemption_mid_prefill_restarts_that_prefill_from_zero() -> None:
    s = _scheduler(rows=2, pages=5, max_step_tokens=12, kv_reservation="lazy")  # 4 usable pages
    _add(s, "old", prompt=15, budget=40)  # 1 page at admission
    _add(s, "new", prompt=40, budget=4)  # 41 tokens: 3 pages
    plan = s.schedule(0.0)
    assert _chunks(plan) == [("old", 0, 12, 15)]  # 12 of 15: nothing left for new
    plan = s.schedule(0.0)  # old's last 3 (+1 decode), then 8 of new
    assert _chunks(plan) == [("old", 12, 3, 15), ("new", 0, 8, 40)]
    assert [d.request_id for d in plan.decodes] == ["old"]
    assert s.kv.num_free == 0 and s.get("new").prefilling  # type: ignore[union-attr]
    plan = s.schedule(0.0)  # old's position 16 needs a page: new (latest admitted) gives its 3 back mid-prefill
    assert [p.request_id for p in plan.preempted] == ["new"] and [g.request_id for g in plan.grown] == ["old"]
    assert plan.prefills == () and [d.request_id for d in plan.decodes] == ["old"]
    waiting = s._waiting[0]
    assert waiting.request_id == "new" and waiting.prefill_tokens == 40 and waiting.num_computed_tokens == 0
    assert s.kv.num_free == 2
    s.finish("old")
    plan = s.schedule(1.0)
    assert _chunks(plan) == [("new", 0, 12, 40)]  # again from 0, the same 40-token prefill
    assert s.kv.num_free == 4 - 3


@pytest.mark.parametrize("reservation", ["full", "lazy"])
def test_chunked_random_traffic_respects_the_budget_starves_no_decode_and_loses_no_page(reservation: str) -> None:
    rng = random.Random(17)
    rows, budget = 5, 40
    s = _scheduler(rows=rows, pages=30, max_step_tokens=budget, kv_reservation=reservation)  # type: ignore[arg-type]
    now = 0.0
    next_id = 0
    progress: dict[str, int] = {}
    chunked = 0
    for _ in range(4000):
        now += rng.random() * 0.003
        if rng.random() < 0.3:
            _add(s, f"r{next_id}", prompt=rng.randint(1, 120), budget=rng.randint(1, 100), t=now)
            next_id += 1
        decoding_before = {r.request_id for r in s.running() if not r.prefilling}
        plan = s.schedule(now)
        assert plan.num_tokens <= budget
        preempted = {p.request_id for p in plan.preempted}
        decoded = {d.request_id for d in plan.decodes}
        assert decoding_before - preempted <= decoded  # every decoding row decodes: none starved
        for p in plan.prefills:
            if p.request_id in preempted or p.start_token == 0:
                progress[p.request_id] = 0
            assert p.start_token == progress.get(p.request_id, 0)  # chunks are contiguous
            progress[p.request_id] = p.start_token + p.num_tokens
            chunked += p.num_tokens < p.total_tokens
            assert p.start_token + p.num_tokens <= p.total_tokens
            assert p.start_token + p.num_tokens <= len(p.pages) * PAGE  # the chunk's slots are in its pages
        assert all(d.position < len(s.get(d.request_id).pages) * PAGE for d in plan.decodes)  # type: ignore[union-attr]
        for r in s.running():
            if rng.random() < 0.03 or r.num_computed_tokens - r.prompt_tokens > r.budget:
                s.finish(r.request_id)
        owned = [p for r in s.running() for p in r.pages]
        free = s.kv.free_pages()
        assert 0 not in owned and 0 not in free and len(set(owned)) == len(owned)
        assert sorted(owned + free) == list(range(1, 30))
        assert sorted([r.row for r in s.running()] + s.free_rows()) == list(range(rows))
    assert chunked > 50


def test_the_smallest_budget_still_completes_a_prompt_beside_a_full_decode_batch() -> None:
    # rows + 1 tokens a step: a prefilling request holds a row, so at most rows - 1 decode and 2 tokens are left,
    # enough for the last prompt token and its first decode: no livelock at the prompt's end.
    s = _chunked(rows=3, budget=4)
    _add(s, "a", prompt=2, budget=100)
    _add(s, "b", prompt=2, budget=100)
    s.schedule(0.0)
    s.schedule(0.0)
    _add(s, "late", prompt=10, budget=4)
    for _ in range(10):
        plan = s.schedule(0.0)
        assert plan.num_tokens <= 4 and {"a", "b"} <= {d.request_id for d in plan.decodes}
        if "late" in {d.request_id for d in plan.decodes}:
            break
    else:
        raise AssertionError("the late prompt never completed")
    assert s.get("late").num_computed_tokens == 11  # type: ignore[union-attr]


def test_a_newcomer_without_room_for_a_token_stops_admission_for_the_step() -> None:
    s = _chunked(rows=4, budget=6)
    _add(s, "a", prompt=4, budget=50)  # 4 + 1: 1 token left
    _add(s, "one", prompt=1, budget=4)  # 1 + its decode needs 2: admitted, nothing this step
    _add(s, "later", prompt=1, budget=4)
    plan = s.schedule(0.0)
    assert _chunks(plan) == [("a", 0, 4, 4)] and s.num_running() == 2 and s.num_waiting() == 1
    plan = s.schedule(0.0)  # 1 decode, then one's token (+ decode), then later's (+ decode)
    assert _chunks(plan) == [("one", 0, 1, 1), ("later", 0, 1, 1)] and plan.num_tokens == 5


def test_deferred_prefill_decodes_only_once_reported_in_and_admits_nothing_while_one_runs() -> None:
    """The engine's async prefill: an admitted request's rows stay out of the decode plan until the engine says
    its prefill is in, and a plan made while a prefill runs admits no one (the running prefill owns the
    prompts it covers); the positions then count from the prompt's end."""
    s = Scheduler(
        ContinuousConfig(max_running=4, page_size=PAGE, max_context_tokens=256),
        KvPageManager(64, PAGE),
        deferred_prefill=True,
    )
    _add(s, "a", prompt=20, budget=8)
    plan = s.schedule(0.0)
    assert _ids(plan) == ["a"] and plan.decodes == ()
    _add(s, "b", prompt=10, budget=8, t=0.0)
    held = s.schedule(1.0, admit=False)
    assert held.prefills == () and held.decodes == () and s.num_waiting() == 1
    s.prefilled("a")
    plan = s.schedule(2.0, admit=False)
    assert [(d.request_id, d.position) for d in plan.decodes] == [("a", 20)]
    plan = s.schedule(3.0)
    assert _ids(plan) == ["b"] and [d.request_id for d in plan.decodes] == ["a"]


def test_deferred_prefill_needs_whole_prompts_and_full_reservation() -> None:
    with pytest.raises(ValueError, match="whole prompts"):
        Scheduler(
            ContinuousConfig(max_running=4, page_size=PAGE, max_step_tokens=64),
            KvPageManager(64, PAGE),
            deferred_prefill=True,
        )
