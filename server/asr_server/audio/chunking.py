"""Cutting long 16 kHz audio into chunks the model decodes one at a time.

The reference library (qwen-asr) cuts greedily: a nominal cut every max_chunk_s, moved to the quietest 100 ms
window within +-5 s of it. We keep that cut rule and improve three things:
- The search window never reaches past start + max_chunk_s, so no chunk exceeds the limit (the reference's
  chunks can run to max_chunk_s + 5 s).
- Nominal cuts are spread evenly over what is left, so chunks have similar lengths instead of full chunks plus
  a short remainder: no sliver of a last chunk (the model guesses on a 0.3 s fragment of a word) and similar
  lengths batch with less padding. The count is ceil(length / max_chunk_s), plus one when that would leave
  less than search_window_s of slack, so a cut always has room to move into a pause; it is recomputed after
  each cut. For chunks under 20 s the search reaches a quarter chunk instead of search_window_s.
- The cut goes in the middle of the quiet stretch, not at the lowest single sample of the quietest window:
  windows within 1 dB of the quietest (or below -100 dBFS) form quiet runs, and the cut is at the centre of the
  longest run (the nearest to the nominal cut on a tie). In digital silence that is the middle of the pause.
Energy is the mean square over the window (the reference sums |x|; either ranks silence first), computed from
cumulative sums over the search window only, so a one-hour file costs a few search windows, not a pass per cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from asr_server.audio.formats import MODEL_SAMPLE_RATE_HZ, samples_to_ms

# Windows within this factor of the quietest window's energy (1 dB) count as equally quiet.
_QUIET_RATIO = 10 ** (1 / 10)
# Mean square below which a window is silence whatever its neighbours (-100 dBFS).
_SILENCE_MEAN_SQUARE = 1e-10


@dataclass(frozen=True)
class ChunkSpan:
    """Samples [start_sample, end_sample) of the 16 kHz audio."""

    start_sample: int
    end_sample: int

    @property
    def length_samples(self) -> int:
        return self.end_sample - self.start_sample

    @property
    def start_ms(self) -> int:
        return samples_to_ms(self.start_sample)

    @property
    def end_ms(self) -> int:
        return samples_to_ms(self.end_sample)


def plan_chunks(
    samples_16k: npt.NDArray[np.float32],
    *,
    max_chunk_s: float,
    search_window_s: float = 5.0,
    quiet_window_ms: int = 100,
) -> list[ChunkSpan]:
    """Spans that cover the audio exactly, in order, without overlap, each at most max_chunk_s long."""
    if samples_16k.ndim != 1:
        raise ValueError(f"plan_chunks takes mono audio, got shape {samples_16k.shape}")
    max_chunk_samples = int(max_chunk_s * MODEL_SAMPLE_RATE_HZ)
    if max_chunk_samples < 1:
        raise ValueError(f"max_chunk_s must be at least one sample long, got {max_chunk_s}")
    total_samples = int(samples_16k.shape[0])
    # The search reaches at most a quarter chunk either way, so short chunks stay balanced.
    search_samples = max(0, min(int(search_window_s * MODEL_SAMPLE_RATE_HZ), max_chunk_samples // 4))
    window_samples = max(1, quiet_window_ms * MODEL_SAMPLE_RATE_HZ // 1000)

    spans: list[ChunkSpan] = []
    start = 0
    while total_samples - start > max_chunk_samples:
        remaining_samples = total_samples - start
        # With no slack (a length that is an exact multiple of the limit) every cut would be forced to a fixed
        # place, through whatever is spoken there; one more chunk buys room to move into a pause.
        remaining_chunks = math.ceil((remaining_samples + search_samples) / max_chunk_samples)
        nominal = start + remaining_samples // remaining_chunks
        # The cut must keep this chunk within the limit and leave the rest coverable by the remaining chunks.
        earliest = max(start + 1, nominal - search_samples, total_samples - (remaining_chunks - 1) * max_chunk_samples)
        latest = min(start + max_chunk_samples, nominal + search_samples)
        cut = _quietest_cut(samples_16k, earliest, latest, nominal, window_samples)
        spans.append(ChunkSpan(start, cut))
        start = cut
    spans.append(ChunkSpan(start, total_samples))
    return spans


def _quietest_cut(
    samples: npt.NDArray[np.float32], earliest: int, latest: int, nominal: int, window_samples: int
) -> int:
    """A cut in [earliest, latest] at the centre of the longest quiet run of windows."""
    if latest - earliest < window_samples:
        return min(max(nominal, earliest), latest)
    segment = samples[earliest:latest].astype(np.float64)
    cumulative = np.concatenate(([0.0], np.cumsum(segment * segment)))
    # Rounding in the running sum can leave tiny negatives where the audio is silent.
    energy = np.maximum(cumulative[window_samples:] - cumulative[:-window_samples], 0.0)
    threshold = max(float(energy.min()) * _QUIET_RATIO, _SILENCE_MEAN_SQUARE * window_samples)
    quiet = np.concatenate(([False], energy <= threshold, [False]))
    edges = np.flatnonzero(quiet[1:] != quiet[:-1])
    run_starts, run_ends = edges[0::2], edges[1::2]  # window indices; each run is [start, end)
    run_lengths = run_ends - run_starts
    centres = earliest + (run_starts + run_ends - 1) // 2 + window_samples // 2
    # Longest run first; among equals, the one nearest the nominal cut.
    best = np.lexsort((np.abs(centres - nominal), -run_lengths))[0]
    return int(centres[best])


def pad_to_min(samples: npt.NDArray[np.float32], min_s: float = 0.5) -> npt.NDArray[np.float32]:
    """Zero-pad at the end to at least min_s (the reference pads chunks under 0.5 s; so does the native
    feature extractor)."""
    min_samples = math.ceil(min_s * MODEL_SAMPLE_RATE_HZ)
    if samples.shape[0] >= min_samples:
        return samples
    return np.pad(samples, (0, min_samples - samples.shape[0])).astype(np.float32, copy=False)
