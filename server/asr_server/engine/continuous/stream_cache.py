"""Encoder outputs of a live stream's open utterance, kept between its interims and its final.

Every interim of a live stream decodes the whole open utterance so far; without this, each one re-encodes all of
it and per-interim work grows with the utterance. The encoder attends within 8 s windows (n_window_infer mel
frames) and never across them, so a completed window's output depends only on that window's features; those
depend on (a) the window's samples and the STFT's reach around them, (b) whether those samples were all real
audio (the centred STFT reflects at the clip's end: a window's last frames change while audio follows closely)
and (c) the clip-global clamp floor (the clip's maximum log-mel - 8, which rises when louder audio arrives).

An entry keeps, per window completed in the request that stored it: a digest of the samples the window's frames
read, the minimum of its frames' log-mel before the clamp, the floor it was encoded under, and its projected
encoder output. A later request of the same key reuses a window only when
- the window is complete in both requests with the STFT's whole reach inside each (`stable_windows`), so no frame
  of it read reflected samples in either;
- the digests are equal (the same samples in the same place: the prefix is the same audio);
- the floors are equal, or every frame of the window lies at or above both floors (min >= max(old, new)), so the
  clamp changed none of its values.
Then its features are the same float32 values in both requests, and so its encoder output is the one a
from-scratch decode would compute (up to the rounding differences the engine already has between batch
compositions: windows of many requests share encoder micro-batches). Anything else is recomputed.

The entry also keeps the decoder's KV of the prompt up to the end of its leading stable windows (`CachedPrefix`:
the template head, then those windows' audio tokens). The decoder is causal, so the K/V at a position depend only
on the tokens up to it: a later request whose head ids are the same and whose leading windows all come from this
entry (so their audio embeddings are these very tensors) would compute the same K/V there. It copies them into
its own pages and prefills from the end of the run instead of from 0 (up to the rounding differences between
prefill shapes, as above), so its decoder work is bounded as its encoder work is.

Memory is bounded per utterance (windows) and in all (bytes, utterances, LRU eviction; the KV prefixes under a
byte bound of their own, the least recently used dropped first); an entry is freed when its final is done, when a
final of its key is aborted, or when untouched for `idle_s` (a stream that ended without a final). A key closed by
its final refuses later stores (an interim of it still in flight).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

# Closed keys remembered so a late interim of a finished utterance cannot store an entry nobody will free.
_CLOSED_KEYS = 4096


@dataclass(frozen=True)
class CachedWindow:
    digest: bytes  # of the samples the window's frames read (window_sample_range)
    min_log_mel: float  # the window's frames' log-mel minimum before the clamp
    floor: float  # the clamp floor its features had
    encoded: torch.Tensor  # (audio tokens of the window, hidden): the projected encoder output

    @property
    def nbytes(self) -> int:
        return int(self.encoded.numel() * self.encoded.element_size())


@dataclass(frozen=True)
class CachedPrefix:
    """The decoder KV of a prompt's tokens [0, tokens): the template head (`head`, ids before the first audio
    token), then the audio tokens of the leading `windows` encoder windows. `keys` and `values` are
    (layers, pages, kv_heads, page_size, head_dim): the whole pages that hold those tokens (the last one may hold
    later tokens of the request that stored it, which a reader overwrites before reading)."""

    head: tuple[int, ...]
    windows: int
    tokens: int
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return int(2 * self.keys.numel() * self.keys.element_size())


@dataclass
class _Entry:
    windows: dict[int, CachedWindow]
    touched_s: float
    nbytes: int = field(default=0)
    prefix: CachedPrefix | None = None


def window_sample_range(window: int, window_samples: int, reach_samples: int) -> tuple[int, int]:
    """The samples window `window`'s frames read: its own and the STFT's reach on both sides."""
    return max(0, window * window_samples - reach_samples), (window + 1) * window_samples + reach_samples


def stable_windows(num_samples: int, window_samples: int, reach_samples: int) -> int:
    """How many leading windows of a clip of `num_samples` are complete with the STFT's reach after them inside
    the clip (so none of their frames reads the end's reflect padding)."""
    return max(0, (num_samples - reach_samples) // window_samples)


def samples_digest(samples: npt.NDArray[np.float32]) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(samples, dtype=np.float32).tobytes(), digest_size=16).digest()


def reusable(cached: CachedWindow, digest: bytes, min_log_mel: float, floor: float) -> bool:
    """Whether `cached` is exactly the window a request with these samples, minimum and floor would encode."""
    if cached.digest != digest:
        return False
    if cached.floor == floor:
        return True
    highest = max(cached.floor, floor)
    return cached.min_log_mel >= highest and min_log_mel >= highest


class StreamEncoderCache:
    def __init__(
        self, max_streams: int, max_windows: int, max_bytes: int, idle_s: float, max_prefix_bytes: int = 0
    ) -> None:
        self.max_streams = max_streams
        self.max_windows = max_windows
        self.max_bytes = max_bytes
        self.max_prefix_bytes = max_prefix_bytes
        self.idle_s = idle_s
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._closed: OrderedDict[str, None] = OrderedDict()
        self.nbytes = 0
        self.prefix_nbytes = 0
        self.hits = 0
        self.misses = 0
        self.prefix_hits = 0

    @property
    def enabled(self) -> bool:
        return self.max_streams > 0 and self.max_windows > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str, window: int, now_s: float) -> CachedWindow | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        entry.touched_s = now_s
        return entry.windows.get(window)

    def prefix(self, key: str) -> CachedPrefix | None:
        """The key's decoder KV prefix (stored with its windows by the same request), if one is kept."""
        entry = self._entries.get(key)
        return None if entry is None else entry.prefix

    def store(
        self, key: str, windows: dict[int, CachedWindow], now_s: float, prefix: CachedPrefix | None = None
    ) -> None:
        """The key's entry becomes `windows` (the newest request's stable windows) and `prefix` (the KV of its
        prompt up to the end of the leading ones), within the bounds."""
        if not self.enabled or key in self._closed:
            return
        self.release(key)
        kept = dict(sorted(windows.items())[: self.max_windows])
        nbytes = sum(w.nbytes for w in kept.values())
        if not kept or nbytes > self.max_bytes:
            return
        if prefix is not None and (
            any(w not in kept for w in range(prefix.windows)) or prefix.nbytes > self.max_prefix_bytes
        ):
            prefix = None
        self._entries[key] = _Entry(kept, now_s, nbytes, prefix)
        self.nbytes += nbytes
        self.prefix_nbytes += 0 if prefix is None else prefix.nbytes
        while len(self._entries) > self.max_streams or self.nbytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self.release(oldest)
        # A token's KV (every layer's) is tens of times its encoder output: over their own bound, the least
        # recently used lose theirs first (their windows stay).
        for entry in self._entries.values():
            if self.prefix_nbytes <= self.max_prefix_bytes:
                break
            if entry.prefix is not None:
                self.prefix_nbytes -= entry.prefix.nbytes
                entry.prefix = None

    def release(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
            if entry.prefix is not None:
                self.prefix_nbytes -= entry.prefix.nbytes

    def close(self, key: str) -> None:
        """The utterance is over (its final is done or aborted): freed, and later stores of it refused."""
        self.release(key)
        self._closed[key] = None
        self._closed.move_to_end(key)
        while len(self._closed) > _CLOSED_KEYS:
            self._closed.popitem(last=False)

    def expire(self, now_s: float) -> None:
        """Frees the entries untouched for idle_s (oldest first: the dict is in use order)."""
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now_s - entry.touched_s < self.idle_s:
                return
            self.release(key)
