"""A bound on decoded audio held in memory by all requests in flight (--max-decoded-audio-mb).

A compressed file says in its header how long it is, so what it will decode to is known before any decoding: a
363 KB FLAC of 4 h of silence decodes to 922 MB of 16 kHz float32. Decoding reserves those bytes first and is
refused at once when they do not fit: RESOURCE_EXHAUSTED with retry advice when other requests hold the budget
(it frees as they finish), without when this request alone is larger than the whole budget.

Thread-safe: decoding runs in worker threads, releases happen on the event loop.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator

from asr_server.audio.formats import MODEL_SAMPLE_RATE_HZ
from asr_server.errors import LimitExceeded, Unavailable

BYTES_PER_MIB = 1024 * 1024
_BYTES_PER_SAMPLE = 4  # float32


def decoded_bytes(frame_count: int, sample_rate_hz: int, channel_count: int) -> int:
    """Bytes of the 16 kHz float32 samples that `frame_count` source frames decode to."""
    return math.ceil(frame_count * MODEL_SAMPLE_RATE_HZ / sample_rate_hz) * channel_count * _BYTES_PER_SAMPLE


class DecodedAudioBudget:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return self._held

    def hold(self) -> BudgetHold:
        """What one request reserves, released together when the request is done."""
        return BudgetHold(self)

    def _take(self, nbytes: int) -> None:
        limit_mib = self.max_bytes / BYTES_PER_MIB
        if nbytes > self.max_bytes:
            raise LimitExceeded(
                f"the audio decodes to {nbytes / BYTES_PER_MIB:.0f} MiB of 16 kHz samples, more than this server's "
                f"--max-decoded-audio-mb={limit_mib:g} for all requests in flight; send shorter audio (or fewer "
                "channels: channel_mode DOWNMIX)"
            )
        with self._lock:
            if self._held + nbytes > self.max_bytes:
                held = self._held
            else:
                self._held += nbytes
                return
        raise LimitExceeded(
            f"decoded audio in flight is at this server's budget (--max-decoded-audio-mb={limit_mib:g}: "
            f"{held / BYTES_PER_MIB:.0f} MiB held, this request needs {nbytes / BYTES_PER_MIB:.0f} MiB); retry "
            "with backoff or on another replica",
            retryable=True,
        )

    def _give(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes


class BudgetHold:
    """One request's share of the budget; `release` gives it all back, and later reservations are refused
    (a decode thread that outlives its cancelled call must not take bytes nobody will release)."""

    def __init__(self, budget: DecodedAudioBudget) -> None:
        self._budget = budget
        self._bytes = 0
        self._released = False
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def reserve(self, nbytes: int) -> None:
        """Takes `nbytes` more; raises LimitExceeded when they do not fit."""
        with self._lock:
            if self._released:
                raise Unavailable("the call ended while its audio was being decoded")
            self._budget._take(nbytes)
            self._bytes += nbytes

    def release(self) -> None:
        with self._lock:
            self._released = True
            nbytes, self._bytes = self._bytes, 0
        self._budget._give(nbytes)


@contextlib.contextmanager
def held_for_call(budget: DecodedAudioBudget | None) -> Iterator[Callable[[int], None] | None]:
    """The reserve callback for one call's decoding (None: no budget); what it reserved is released when the call
    is done with its audio (its answer sent, or it failed or was cancelled). One helper for every edge."""
    if budget is None:
        yield None
        return
    hold = budget.hold()
    try:
        yield hold.reserve
    finally:
        hold.release()
