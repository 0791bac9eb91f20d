"""Keeps CPython's cyclic garbage collector from pausing a serving process for hundreds of milliseconds.

A loaded process holds millions of long-lived container objects (torch, transformers, grpc, the model's modules),
and every full collection walks all of them: in the engine process on an H200 with the 1.7B and 256 live streams,
a full collection came every 7-9 s and took 380-500 ms (`{"k": "gc"}` lines of --bench-trace-path), stopping every
decode step and every stream with it. Freezing the heap once loading is done moves those objects to the permanent
generation, so later collections walk only what serving allocated since. vLLM's engine core does the same after
start-up (`gc.freeze()` once the model and CUDA graphs are built).

Called from process entry points only (the standalone server, a front process, an engine process, the aligner
sidecar; for the sidecar the same reasoning, not measured), never by servers tests start: many of them run in one
process, and frozen cycles are never collected.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger(__name__)


def freeze_startup_heap(process: str) -> int:
    """Collects what start-up left behind, then freezes every surviving object; returns how many were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("%s: %d objects from start-up frozen out of garbage collection", process, frozen)
    return frozen
