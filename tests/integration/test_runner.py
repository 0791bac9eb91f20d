"""The engine thread's batching, fan-out, cancellation and back-pressure, with the fake core."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from asr_server.engine.fake import FakeEngine
from asr_server.engine.runner import BatchingPolicy, EngineRunner
from asr_server.engine.types import DecodeOptions, DecodeRequest
from asr_server.errors import LimitExceeded, Unavailable


def request(i: int, seconds: float = 1.0) -> DecodeRequest:
    samples = np.full(int(16000 * seconds), 0.01 * (i + 1), dtype=np.float32)
    return DecodeRequest(f"r{i}", samples, DecodeOptions(None, "", 64))


async def started(core: FakeEngine, **policy: float) -> EngineRunner:
    values = {"max_batch_size": 8, "max_batch_wait_ms": 50.0, "max_queued_requests": 100}
    values.update(policy)
    runner = EngineRunner(lambda: core, BatchingPolicy(**values))  # type: ignore[arg-type]
    await runner.start()
    return runner


async def test_requests_arriving_together_share_a_batch_and_each_gets_its_result() -> None:
    core = FakeEngine(max_batch_size=8)
    runner = await started(core)
    results = await asyncio.gather(*(runner.decode(request(i)) for i in range(8)))
    await runner.stop()
    assert [r.request_id for r in results] == [f"r{i}" for i in range(8)]
    assert [r.text for r in results] == [f"w{10 * (i + 1)} w{10 * (i + 1)}" for i in range(8)]
    assert core.batches == [[f"r{i}" for i in range(8)]]
    assert all(r.batch.batch_size == 8 for r in results)


async def test_a_partial_batch_waits_at_most_max_batch_wait_ms() -> None:
    core = FakeEngine(max_batch_size=8)
    runner = await started(core, max_batch_wait_ms=30.0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await runner.decode(request(0))
    elapsed = loop.time() - began
    await runner.stop()
    assert 0.025 <= elapsed < 0.5


async def test_more_requests_than_a_batch_are_split_in_arrival_order() -> None:
    core = FakeEngine(max_batch_size=3)
    runner = await started(core, max_batch_size=3, max_batch_wait_ms=100.0)
    await asyncio.gather(*(runner.decode(request(i)) for i in range(7)))
    await runner.stop()
    assert [len(b) for b in core.batches] == [3, 3, 1]
    assert sum(core.batches, []) == [f"r{i}" for i in range(7)]


async def test_cancelling_a_waiting_request_removes_it_from_the_engine() -> None:
    core = FakeEngine(max_batch_size=1, batch_delay_ms=200)
    runner = await started(core, max_batch_size=1, max_batch_wait_ms=0.0)
    first = asyncio.ensure_future(runner.decode(request(0)))
    while not core.batches:  # the engine thread is inside the first step
        await asyncio.sleep(0.001)
    second = asyncio.ensure_future(runner.decode(request(1)))
    await asyncio.sleep(0)  # second is queued behind the running step
    assert runner.in_flight == 2
    second.cancel()
    await first
    await runner.stop()  # joins the engine thread: whatever it would have run has run
    # Whether the engine saw it and dropped it, or never saw it, it never ran.
    assert core.batches == [["r0"]]
    assert runner.in_flight == 0


async def test_a_full_queue_is_refused_as_retryable() -> None:
    core = FakeEngine(max_batch_size=1, batch_delay_ms=200)
    runner = await started(core, max_batch_size=1, max_queued_requests=2)
    pending = [asyncio.ensure_future(runner.decode(request(i))) for i in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(LimitExceeded) as caught:
        await runner.decode(request(9))
    assert caught.value.retryable and "limit 2" in str(caught.value)
    await asyncio.gather(*pending)
    await runner.stop()


async def test_a_failing_step_fails_its_callers_and_the_engine_goes_on() -> None:
    calls = {"n": 0}

    def explode_once(requests: list[DecodeRequest]) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device fell over")

    core = FakeEngine(max_batch_size=4, on_step=explode_once)
    runner = await started(core, max_batch_wait_ms=0.0)
    with pytest.raises(RuntimeError, match="device fell over"):
        await runner.decode(request(0))
    result = await runner.decode(request(1))
    await runner.stop()
    assert result.text


async def test_after_stop_requests_are_unavailable() -> None:
    core = FakeEngine(max_batch_size=1)
    runner = await started(core)
    await runner.stop()
    assert core.closed
    with pytest.raises(Unavailable):
        await runner.decode(request(0))


async def test_a_stop_queued_behind_a_failing_step_still_stops_the_engine() -> None:
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def explode_after_stop_is_queued(requests: list[DecodeRequest]) -> None:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=5)
        raise RuntimeError("device fell over")

    core = FakeEngine(max_batch_size=4, on_step=explode_after_stop_is_queued)
    runner = await started(core, max_batch_wait_ms=0.0)
    failing = asyncio.ensure_future(runner.decode(request(0)))
    while not core.batches:
        await asyncio.sleep(0.001)
    stopping = asyncio.ensure_future(runner.stop())
    await asyncio.sleep(0)  # stop() has put its command in the inbox
    release.set()
    await asyncio.wait_for(stopping, timeout=5)
    with pytest.raises(RuntimeError, match="device fell over"):
        await failing
    assert core.closed


async def test_an_engine_thread_that_dies_refuses_later_requests_instead_of_hanging() -> None:
    class BrokenAdd(FakeEngine):
        def add(self, item: object) -> None:
            raise RuntimeError("core bug")

    core = BrokenAdd(max_batch_size=4)
    runner = await started(core, max_batch_wait_ms=0.0)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(runner.decode(request(0)), timeout=5)
    assert runner.state == "failed"
    with pytest.raises(Unavailable, match="failed"):
        await runner.decode(request(1))
    await asyncio.wait_for(runner.stop(), timeout=5)


async def test_warmup_can_be_skipped() -> None:
    warmed: list[bool] = []

    class CountingWarmup(FakeEngine):
        def warmup(self) -> None:
            warmed.append(True)

    runner = EngineRunner(lambda: CountingWarmup(max_batch_size=1), BatchingPolicy(1, 0.0, 10), warmup=False)
    await runner.start()
    await runner.stop()
    assert warmed == []


async def test_a_thread_that_dies_before_start_returns_is_not_reported_ready() -> None:
    class DiesAtOnce(FakeEngine):
        def num_waiting(self) -> int:
            raise RuntimeError("core bug")

    runner = EngineRunner(lambda: DiesAtOnce(max_batch_size=1), BatchingPolicy(1, 0.0, 10))
    starting = asyncio.ensure_future(runner.start())
    await asyncio.sleep(0)  # start() has launched the thread and waits for it
    thread = runner._worker.thread
    assert thread is not None
    thread.join(5)  # blocks this loop, so start() resumes only after the thread is gone
    with pytest.raises(RuntimeError, match="failed right after loading"):
        await starting
    with pytest.raises(Unavailable):
        await asyncio.wait_for(runner.decode(request(0)), timeout=5)
