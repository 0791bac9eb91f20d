"""Benchmarks: a JSON-lines timeline of the continuous engine (--bench-trace-path), to see where a request's time
goes (waiting for its features, for admission, in prefill, in decode) and what each step did.

One line per finished request ({"k": "req", ...}: wall-clock ns of its arrival in the core, features ready,
prefill start, first token, end), one per step that did work ({"k": "step", ...}: monotonic ns of its start and
the ms of each phase on the host) and one per garbage collection of the engine process's heap that was of the
oldest generation or took >= 5 ms ({"k": "gc", ...}: monotonic ns of its start, generation, ms, objects
collected): on the H200, 256 live streams showed a freeze of every thread of the engine process (GPU 0%) every
10-13 s, and Python's full collections are the first suspect. Written on the engine thread, line-buffered (a few
hundred short lines a second; a reader may cut the file between loads at any time): a benchmark aid, off by
default.
"""

from __future__ import annotations

import gc
import json
import time
from collections import deque
from typing import IO, Any

_GC_REPORT_MS = 5.0


class EngineTrace:
    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()
        # Collections run on whichever thread allocates; they are queued here (deque appends are atomic) and
        # written by the engine thread, never from inside a collection (a write there could re-enter the file's
        # buffer mid-line).
        self._gc_done: deque[dict[str, Any]] = deque(maxlen=10_000)
        self._gc_start_ns = 0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start_ns = time.monotonic_ns()
            return
        took_ms = (time.monotonic_ns() - self._gc_start_ns) / 1e6
        generation = int(info.get("generation", -1))
        if generation == 2 or took_ms >= _GC_REPORT_MS:
            self._gc_done.append(
                {"t": self._gc_start_ns, "gen": generation, "ms": round(took_ms, 2), "collected": info.get("collected")}
            )

    def write(self, kind: str, **fields: Any) -> None:
        while self._gc_done:
            self._line("gc", self._gc_done.popleft())
        self._line(kind, fields)

    def _line(self, kind: str, fields: dict[str, Any]) -> None:
        self._file.write(json.dumps({"k": kind, **fields}, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self._file.close()
