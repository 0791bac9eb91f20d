"""Admission order in the engine's queues: a live stream's final before recorded audio before an interim, arrival
order within a priority (WaitingQueue of the fake and generate cores; the continuous scheduler)."""

from __future__ import annotations

import numpy as np

from asr_server.config import ContinuousConfig
from asr_server.engine.continuous.kv_manager import KvPageManager
from asr_server.engine.continuous.scheduler import Scheduler
from asr_server.engine.fake import FakeEngine
from asr_server.engine.types import DecodeOptions, DecodePriority, DecodeRequest, WaitingQueue, WorkItem
from tests.unit.test_scheduler import FakeSource

FINAL, NORMAL, INTERIM = DecodePriority.FINAL, DecodePriority.NORMAL, DecodePriority.INTERIM


def _item(request_id: str, priority: DecodePriority, arrived_s: float = 0.0) -> WorkItem:
    audio = np.full(8000, 0.1, dtype=np.float32)
    request = DecodeRequest(request_id, audio, DecodeOptions(None, "", 16), priority=priority)
    return WorkItem(request, 0, arrived_s)


def test_the_waiting_queue_takes_by_priority_then_arrival() -> None:
    queue = WaitingQueue()
    order = [("i1", INTERIM), ("n1", NORMAL), ("i2", INTERIM), ("f1", FINAL), ("n2", NORMAL), ("f2", FINAL)]
    for t, (rid, priority) in enumerate(order):
        queue.add(_item(rid, priority, arrived_s=float(t)))
    assert queue.oldest_monotonic_s() == 0.0  # i1's: the batch-wait deadline counts from the longest waiting
    queue.remove("n2")
    assert [w.request.request_id for w in queue.take(3)] == ["f1", "f2", "n1"]
    assert len(queue) == 2 and queue.oldest_monotonic_s() == 0.0
    queue.add(_item("f3", FINAL, arrived_s=9.0))
    assert [w.request.request_id for w in queue.take(10)] == ["f3", "i1", "i2"]
    assert queue.oldest_monotonic_s() is None


def test_a_default_request_is_normal_priority() -> None:
    request = DecodeRequest("r", np.zeros(10, dtype=np.float32), DecodeOptions(None, "", 4))
    assert request.priority is NORMAL


def test_the_fake_engine_batches_finals_ahead_of_interims_that_came_first() -> None:
    engine = FakeEngine(max_batch_size=2)
    for t, rid in enumerate(["i0", "i1", "i2", "i3"]):
        engine.add(_item(rid, INTERIM, arrived_s=float(t)))
    engine.add(_item("f0", FINAL, arrived_s=4.0))
    engine.add(_item("n0", NORMAL, arrived_s=5.0))
    assert engine.oldest_waiting_monotonic_s() == 0.0
    outputs = engine.step()
    assert [o.request_id for o in outputs] == ["f0", "n0"]
    engine.abort("i1")
    assert [o.request_id for o in engine.step()] == ["i0", "i2"]
    assert engine.batches == [["f0", "n0"], ["i0", "i2"]] and engine.num_waiting() == 1


def _scheduler(rows: int, **config: float) -> Scheduler:
    settings = {"max_running": rows, "page_size": 16, "max_context_tokens": 256, **config}
    return Scheduler(ContinuousConfig(**settings), KvPageManager(64, 16))  # type: ignore[arg-type]


def test_the_continuous_scheduler_admits_finals_first_and_interims_last() -> None:
    s = _scheduler(rows=2)
    s.add("i0", 0.0, 4, 10, FakeSource(10), priority=INTERIM)
    s.add("n0", 1.0, 4, 10, FakeSource(10), priority=NORMAL)
    s.add("i1", 2.0, 4, 10, FakeSource(10), priority=INTERIM)
    s.add("f0", 3.0, 4, 10, FakeSource(10), priority=FINAL)
    assert s.oldest_waiting_monotonic_s() == 0.0
    assert [p.request_id for p in s.schedule(3.0).prefills] == ["f0", "n0"]
    s.finish("f0")
    s.add("f1", 4.0, 4, 10, FakeSource(10), priority=FINAL)
    s.add("n1", 4.0, 4, 10, FakeSource(10))  # NORMAL by default
    assert [p.request_id for p in s.schedule(4.0).prefills] == ["f1"]
    s.finish("n0")
    s.finish("f1")
    assert [p.request_id for p in s.schedule(5.0).prefills] == ["n1", "i0"]


def test_the_prefill_interval_counts_from_the_longest_waiting_not_from_the_final_in_front() -> None:
    s = _scheduler(rows=8, prefill_interval_ms=12.0)
    s.add("running", 0.0, 50, 10, FakeSource(10))
    s.schedule(0.0)
    s.add("i0", 0.0, 4, 10, FakeSource(10), priority=INTERIM)
    s.add("f0", 1.0, 4, 10, FakeSource(10), priority=FINAL)
    # f0 waited 1 ms, i0 1001 ms: the newcomers are due (counted from f0, they would wait for company).
    assert [p.request_id for p in s.schedule(1.001).prefills] == ["f0", "i0"]


def test_a_preempted_request_back_in_front_keeps_its_place_ahead_of_its_own_priority() -> None:
    s = _scheduler(rows=1)
    s.add("n0", 0.0, 4, 10, FakeSource(10))
    s._waiting[0].num_preemptions = 1  # as _preempt leaves it: at the front of the queue
    s.add("n1", 1.0, 4, 10, FakeSource(10))
    s.add("f0", 2.0, 4, 10, FakeSource(10), priority=FINAL)
    assert [r.request_id for r in s._waiting] == ["f0", "n0", "n1"]
