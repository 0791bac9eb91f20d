"""Benchmarks: a JSON-lines timeline of the continuous engine (--bench-trace-path), to see where a request's time
goes (waiting for its features, for admission, in prefill, in decode) and what each step did.

One line per finished request ({"k": "req", ...}: wall-clock ns of its arrival in the core, features ready,
prefill start, first token, end) and one per step that did work ({"k": "step", ...}: monotonic ns of its start and
the ms of each phase on the host). Written on the engine thread, line-buffered (a few hundred short lines a
second; a reader may cut the file between loads at any time): a benchmark aid, off by default.
"""

from __future__ import annotations

import json
from typing import IO, Any


class EngineTrace:
    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()

    def write(self, kind: str, **fields: Any) -> None:
        self._file.write(json.dumps({"k": kind, **fields}, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()
