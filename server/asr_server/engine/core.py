"""The engine's inner interface: a synchronous core that only the engine thread ever calls.

Like vLLM's EngineCore, a core is driven by `step()`. A step of the batching `generate` core decodes one
whole batch; a continuous-batching core would advance every running request by one token. The runner
(runner.py) owns the thread, the inbox and the output fan-out, so every core gets dynamic batching,
cancellation and back-pressure the same way.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from asr_server.engine.types import DecodeResult, WorkItem


@dataclass(frozen=True)
class EngineOutput:
    request_id: str
    result: DecodeResult | None = None
    error: Exception | None = None


class EngineCore(Protocol):
    # Shown in server info and trace attributes.
    model_id: str

    def warmup(self) -> None:
        """Runs a representative batch so the first caller does not pay for lazy initialisation."""

    def add(self, item: WorkItem) -> None: ...

    def abort(self, request_id: str) -> None:
        """Drops a request; a request in a batch that is already running is discarded when it ends."""

    def num_waiting(self) -> int: ...

    def num_running(self) -> int: ...

    def oldest_waiting_monotonic_s(self) -> float | None: ...

    def step(self) -> list[EngineOutput]:
        """Does one unit of work; returns the requests it finished (or failed). Never raises for one
        request's fault: that request gets an error output and the others go on."""
        ...

    def close(self) -> None: ...


# Upper bounds of the batch-size histogram (rows per decode step or batch); a last, open bucket follows.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class CoreStats:
    """What a core has done since it started (counters) and holds now (gauges), for the metrics.

    Counters only grow, so a scrape that reads them a step late is merely a step behind; nothing is reset.
    """

    # Decode steps (continuous) or batches (generate, fake), and their rows per step, by BATCH_SIZE_BUCKETS: one
    # count per bucket, then one for larger batches (not cumulative).
    steps: int
    rows: int
    batch_size_counts: tuple[int, ...]
    # Tokens the core generated (one per live row per decode step; a batch's rows' tokens).
    generated_tokens: int
    # KV cache pages (continuous core): in use by requests, and usable in all; None where the core has no paged
    # cache.
    kv_pages_used: int | None = None
    kv_pages_total: int | None = None
    # Requests queued for a batch slot and decoding (gauges): set by an engine process for its front, which cannot
    # ask the core's queues itself; None where the reader asks the core directly.
    waiting_requests: int | None = None
    running_requests: int | None = None


@runtime_checkable
class ReportsStats(Protocol):
    """An EngineCore that can report CoreStats (optional: the metrics leave out what a core does not report)."""

    def stats(self) -> CoreStats:
        """Called from any thread (the scrape thread, the engine process's loop): reads, never locks or waits."""
        ...


def core_stats(core: object) -> CoreStats | None:
    return core.stats() if isinstance(core, ReportsStats) else None


class StepCounter:
    """The counters behind CoreStats; only the engine thread adds to them (plain int updates, which the GIL keeps
    whole for a reader on another thread)."""

    def __init__(self) -> None:
        self.steps = 0
        self.rows = 0
        self.generated_tokens = 0
        self._counts = [0] * (len(BATCH_SIZE_BUCKETS) + 1)

    def step(self, rows: int, generated_tokens: int = 0) -> None:
        """One decode step or batch of `rows` rows."""
        self._counts[bisect.bisect_left(BATCH_SIZE_BUCKETS, rows)] += 1
        self.steps += 1
        self.rows += rows
        self.generated_tokens += generated_tokens

    def tokens(self, generated_tokens: int) -> None:
        """Tokens generated outside a counted step (a prefill's first token)."""
        self.generated_tokens += generated_tokens

    def snapshot(self, *, kv_pages_used: int | None = None, kv_pages_total: int | None = None) -> CoreStats:
        return CoreStats(
            steps=self.steps,
            rows=self.rows,
            batch_size_counts=tuple(self._counts),
            generated_tokens=self.generated_tokens,
            kv_pages_used=kv_pages_used,
            kv_pages_total=kv_pages_total,
        )
