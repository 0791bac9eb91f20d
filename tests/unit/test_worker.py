"""The generic thread-owned worker: states, admission, back-pressure, cancellation and answering on exit.

The body below does only what each test scripts through its jobs' names; every wait is on an event, with a timeout
so that a bug fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from asr_server.errors import LimitExceeded, Unavailable
from asr_server.worker import Inbox, Stop, ThreadWorker, Ticket, Withdrawn, WorkerBody, WorkerTexts

TEXTS = WorkerTexts(
    noun="test worker",
    queue_full="the test queue is full ({waiting} waiting, limit {limit})",
    not_ready="the test worker is {state}",
    shutting_down="the test worker is shutting down",
    crashed="the test worker failed",
)
WAIT_S = 5.0


class Core:
    def __init__(self) -> None:
        self.warmed_on: str | None = None
        self.closed = False

    def warmup(self) -> None:
        self.warmed_on = threading.current_thread().name


class Body(WorkerBody[Core, str, str]):
    """Answers a job with its name upper-cased. "hold*" waits for `gate` first, "keep*" is held unanswered,
    "crash*" waits for `gate` and then raises."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.withdrawn: list[str] = []
        self.held: list[Ticket[str, str]] = []
        self.entered = threading.Event()  # a hold or crash job is waiting for the gate
        self.gate = threading.Event()
        self.kept = threading.Semaphore(0)  # released once per kept job

    def serve(self, core: Core, inbox: Inbox[str, str]) -> None:
        while True:
            message = inbox.get()
            if isinstance(message, Stop):
                return
            if isinstance(message, Withdrawn):
                self.withdrawn.append(message.ticket.job)
                continue
            assert message is not None  # no timeout given
            self.seen.append(message.job)
            self.held.append(message)
            if message.job.startswith("keep"):
                self.kept.release()
                continue
            if message.job.startswith(("hold", "crash")):
                self.entered.set()
                self.gate.wait(WAIT_S)
                if message.job.startswith("crash"):
                    raise RuntimeError("body bug")
            self.held.remove(message)
            message.settle(message.job.upper())

    def finish(self, core: Core, error: Unavailable) -> None:
        for ticket in self.held:
            ticket.settle(error)
        core.closed = True


def make(
    body: Body, core: Core | None = None, *, max_queued: int = 10, warmup: bool = True
) -> ThreadWorker[Core, str, str]:
    the_core = core or Core()
    return ThreadWorker(lambda: the_core, body, name="test-thread", texts=TEXTS, max_queued=max_queued, warmup=warmup)


async def wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, WAIT_S)


async def test_start_loads_and_warms_the_core_on_the_worker_thread_and_serves() -> None:
    core = Core()
    worker = make(Body(), core)
    assert worker.state == "new" and worker.core is None
    await worker.start()
    assert worker.state == "ready" and worker.core is core
    assert core.warmed_on == "test-thread"
    assert await asyncio.wait_for(worker.submit("a"), WAIT_S) == "A"
    assert worker.in_flight == 0
    await worker.stop()
    assert worker.state == "stopped" and core.closed


async def test_warmup_can_be_skipped() -> None:
    core = Core()
    worker = make(Body(), core, warmup=False)
    await worker.start()
    await worker.stop()
    assert core.warmed_on is None


async def test_callers_are_refused_before_start_and_after_stop() -> None:
    worker = make(Body())
    with pytest.raises(Unavailable, match="the test worker is new"):
        await worker.submit("a")
    await worker.start()
    await worker.stop()
    with pytest.raises(Unavailable, match="the test worker is stopped"):
        await worker.submit("b")
    with pytest.raises(RuntimeError, match="test worker already stopped"):
        await worker.start()


async def test_a_core_that_fails_to_load_fails_start_and_refuses_callers() -> None:
    def no_model() -> Core:
        raise OSError("no model here")

    worker: ThreadWorker[Core, str, str] = ThreadWorker(no_model, Body(), name="t", texts=TEXTS, max_queued=10)
    with pytest.raises(RuntimeError, match="test worker failed to start: no model here"):
        await worker.start()
    assert worker.state == "failed" and worker.core is None
    with pytest.raises(Unavailable, match="is failed"):
        await worker.submit("a")


async def test_a_body_that_dies_answers_held_and_queued_callers_and_refuses_later_ones() -> None:
    body = Body()
    worker = make(body)
    await worker.start()
    crashing = asyncio.ensure_future(worker.submit("crash"))
    await wait_for(body.entered)
    queued = asyncio.ensure_future(worker.submit("b"))  # behind the crash, still in the inbox
    await asyncio.sleep(0)  # queued is admitted
    body.gate.set()
    for call in (crashing, queued):
        with pytest.raises(Unavailable, match="the test worker failed"):
            await asyncio.wait_for(call, WAIT_S)
    assert body.seen == ["crash"]
    assert worker.state == "failed"
    with pytest.raises(Unavailable, match="is failed"):
        await worker.submit("c")
    await asyncio.wait_for(worker.stop(), WAIT_S)
    assert worker.core is not None and worker.core.closed


async def test_stop_answers_held_work_with_the_shutdown_error() -> None:
    body = Body()
    worker = make(body)
    await worker.start()
    calls = [asyncio.ensure_future(worker.submit(f"keep{i}")) for i in range(2)]
    for _ in calls:
        assert await asyncio.to_thread(body.kept.acquire, True, WAIT_S)
    await asyncio.wait_for(worker.stop(), WAIT_S)
    for call in calls:
        with pytest.raises(Unavailable, match="shutting down"):
            await asyncio.wait_for(call, WAIT_S)
    assert worker.state == "stopped"


async def test_a_full_queue_is_refused_as_retryable_until_callers_are_answered() -> None:
    body = Body()
    worker = make(body, max_queued=2)
    await worker.start()
    held = asyncio.ensure_future(worker.submit("hold"))
    await wait_for(body.entered)
    queued = asyncio.ensure_future(worker.submit("b"))
    await asyncio.sleep(0)
    assert worker.in_flight == 2
    with pytest.raises(LimitExceeded, match=r"\(2 waiting, limit 2\)") as caught:
        await worker.submit("c")
    assert caught.value.retryable
    body.gate.set()
    assert list(await asyncio.wait_for(asyncio.gather(held, queued), WAIT_S)) == ["HOLD", "B"]
    assert worker.in_flight == 0
    assert await asyncio.wait_for(worker.submit("d"), WAIT_S) == "D"
    await worker.stop()


async def test_a_caller_cancelled_while_queued_never_reaches_the_body() -> None:
    body = Body()
    worker = make(body)
    await worker.start()
    held = asyncio.ensure_future(worker.submit("hold"))
    await wait_for(body.entered)
    cancelled = asyncio.ensure_future(worker.submit("gone"))
    after = asyncio.ensure_future(worker.submit("after"))
    await asyncio.sleep(0)  # both are queued behind the held job
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert worker.in_flight == 2
    body.gate.set()
    assert list(await asyncio.wait_for(asyncio.gather(held, after), WAIT_S)) == ["HOLD", "AFTER"]
    await worker.stop()
    assert body.seen == ["hold", "after"]
    assert body.withdrawn == ["gone"]  # told, though it never saw the job: a body ignores what it does not hold


async def test_a_caller_cancelled_while_its_job_is_held_is_withdrawn() -> None:
    body = Body()
    worker = make(body)
    await worker.start()
    kept = asyncio.ensure_future(worker.submit("keep"))
    assert await asyncio.to_thread(body.kept.acquire, True, WAIT_S)
    kept.cancel()
    with pytest.raises(asyncio.CancelledError):
        await kept
    assert await asyncio.wait_for(worker.submit("next"), WAIT_S) == "NEXT"  # the withdrawal came before it
    await worker.stop()
    assert body.withdrawn == ["keep"]


def test_an_answer_to_a_closed_loop_is_dropped_not_raised() -> None:
    loop = asyncio.new_event_loop()
    future: asyncio.Future[int] = loop.create_future()
    ticket: Ticket[str, int] = Ticket("job", loop, future, 0.0)
    loop.close()
    ticket.settle(1)  # raised RuntimeError('Event loop is closed') in the worker's thread, which then died
    assert not future.done()
