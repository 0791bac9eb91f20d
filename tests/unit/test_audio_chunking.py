from __future__ import annotations

import functools
import math
import time

import numpy as np
import numpy.typing as npt
import pytest

from asr_server.audio.chunking import ChunkSpan, pad_to_min, plan_chunks

RATE_HZ = 16_000


@functools.lru_cache(maxsize=1)
def burst_recording(seconds: float) -> tuple[npt.NDArray[np.float32], list[tuple[int, int]]]:
    """'Speech' bursts (noise plus a 180 Hz tone, 0.5-3.5 s, 20 ms fades) separated by silences (0.4-1.2 s) with
    a -80 dBFS noise floor. Any 5 s stretch holds a whole silence, so every cut can land in one. Returns samples
    and the silences as [start, end) sample ranges. Built from tiled templates: 25 minutes in ~0.2 s."""
    rng = np.random.default_rng(0)
    total = int(seconds * RATE_HZ)
    floor = (1e-4 * rng.standard_normal(RATE_HZ, dtype=np.float32)).astype(np.float32)
    samples = np.tile(floor, total // RATE_HZ + 1)[:total]
    t = np.arange(4 * RATE_HZ, dtype=np.float32) / RATE_HZ
    voice = (0.2 * rng.standard_normal(t.shape[0], dtype=np.float32) + 0.3 * np.sin(2 * np.pi * 180 * t)).astype(
        np.float32
    )
    fade = np.linspace(0.0, 1.0, RATE_HZ // 50, dtype=np.float32)
    silences = []
    position = int(rng.uniform(0.4, 1.2) * RATE_HZ)
    silences.append((0, position))
    while position < total:
        burst = min(int(rng.uniform(0.5, 3.5) * RATE_HZ), total - position)
        shaped = voice[:burst].copy()
        edge = min(fade.shape[0], burst // 2)
        shaped[:edge] *= fade[:edge]
        shaped[burst - edge :] *= fade[:edge][::-1]
        samples[position : position + burst] += shaped
        position += burst
        gap = int(rng.uniform(0.4, 1.2) * RATE_HZ)
        silences.append((position, min(position + gap, total)))
        position += gap
    return samples, silences


def assert_exact_cover(spans: list[ChunkSpan], total: int, max_samples: int) -> None:
    assert spans[0].start_sample == 0 and spans[-1].end_sample == total
    for previous, following in zip(spans, spans[1:], strict=False):
        assert previous.end_sample == following.start_sample
    for span in spans:
        assert 0 < span.length_samples <= max_samples


@pytest.mark.parametrize("max_chunk_s", [1200.0, 180.0, 30.0])
def test_25_minute_recording_is_cut_only_in_silences(max_chunk_s: float) -> None:
    samples, silences = burst_recording(25 * 60)
    spans = plan_chunks(samples, max_chunk_s=max_chunk_s)

    # ceil(length / max), or more when a cut had to use up the slack (never below the minimum).
    assert math.ceil(samples.shape[0] / (max_chunk_s * RATE_HZ)) <= len(spans)
    assert len(spans) <= math.ceil(samples.shape[0] / ((max_chunk_s - 10) * RATE_HZ))
    assert_exact_cover(spans, samples.shape[0], int(max_chunk_s * RATE_HZ))
    starts = np.array([s for s, _ in silences])
    for span in spans[1:]:
        cut = span.start_sample
        index = int(np.searchsorted(starts, cut, side="right")) - 1
        silence_start, silence_end = silences[index]
        assert silence_start <= cut < silence_end, f"cut at {cut / RATE_HZ:.2f} s is not in a silence"
        # The cut sits in the middle of the quiet stretch, so both chunks keep some silence at the seam.
        assert min(cut - silence_start, silence_end - cut) >= 0.1 * RATE_HZ


def test_chunks_are_balanced_not_full_plus_remainder() -> None:
    samples, _ = burst_recording(25 * 60)
    lengths_s = [s.length_samples / RATE_HZ for s in plan_chunks(samples, max_chunk_s=1200.0)]
    # The reference would give 1200 s + 300 s; evenly spread nominal cuts give two near 750 s.
    assert len(lengths_s) == 2 and all(745 <= length <= 755 for length in lengths_s)


def test_short_audio_is_one_chunk() -> None:
    samples = np.zeros(RATE_HZ * 10, dtype=np.float32)
    assert plan_chunks(samples, max_chunk_s=10.0) == [ChunkSpan(0, RATE_HZ * 10)]
    assert plan_chunks(samples[:0], max_chunk_s=10.0) == [ChunkSpan(0, 0)]


def test_cut_goes_to_the_middle_of_a_digital_silence() -> None:
    loud = (0.5 * np.random.default_rng(0).standard_normal(RATE_HZ * 30)).astype(np.float32)
    loud[int(17.0 * RATE_HZ) : int(19.0 * RATE_HZ)] = 0.0
    spans = plan_chunks(loud, max_chunk_s=20.0)
    assert len(spans) == 2
    assert spans[0].end_sample == pytest.approx(18.0 * RATE_HZ, abs=RATE_HZ * 0.01)


def test_longest_quiet_run_wins_over_a_brief_one() -> None:
    loud = (0.5 * np.random.default_rng(1).standard_normal(RATE_HZ * 30)).astype(np.float32)
    loud[int(14.0 * RATE_HZ) : int(14.2 * RATE_HZ)] = 0.0  # brief pause, nearer the nominal cut (15 s)
    loud[int(17.5 * RATE_HZ) : int(19.5 * RATE_HZ)] = 0.0  # long pause
    spans = plan_chunks(loud, max_chunk_s=20.0)
    assert spans[0].end_sample == pytest.approx(18.5 * RATE_HZ, abs=RATE_HZ * 0.01)


def test_no_chunk_exceeds_the_limit_even_when_the_quiet_spot_is_past_it() -> None:
    # The reference searches +-5 s around start + max, so it would cut at 22 s and make a 22 s chunk.
    loud = (0.5 * np.random.default_rng(2).standard_normal(RATE_HZ * 40)).astype(np.float32)
    loud[int(21.5 * RATE_HZ) : int(22.5 * RATE_HZ)] = 0.0
    spans = plan_chunks(loud, max_chunk_s=20.0)
    assert_exact_cover(spans, loud.shape[0], 20 * RATE_HZ)


def test_exact_multiple_of_the_limit_gets_room_to_move() -> None:
    # 60 s at a 20 s limit: three chunks would force cuts at exactly 20 s and 40 s, here in the middle of noise,
    # so one more chunk is used and both cuts reach the pauses.
    loud = (0.5 * np.random.default_rng(3).standard_normal(RATE_HZ * 60)).astype(np.float32)
    for pause_s in (14.0, 29.0, 44.0):
        loud[int(pause_s * RATE_HZ) : int((pause_s + 1) * RATE_HZ)] = 0.0
    spans = plan_chunks(loud, max_chunk_s=20.0)
    assert len(spans) == 4
    assert [round(s.end_sample / RATE_HZ, 1) for s in spans[:-1]] == [14.5, 29.5, 44.5]


def test_small_max_chunk_and_constant_signal() -> None:
    samples = np.full(RATE_HZ * 7, 0.1, dtype=np.float32)
    spans = plan_chunks(samples, max_chunk_s=1.0)
    # 7 would leave no slack; ties everywhere put each cut mid-window, which can cost one more.
    assert 8 <= len(spans) <= 9
    assert_exact_cover(spans, samples.shape[0], RATE_HZ)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        plan_chunks(np.zeros(10, np.float32), max_chunk_s=0.0)
    with pytest.raises(ValueError):
        plan_chunks(np.zeros((2, 10), np.float32), max_chunk_s=1.0)


def test_one_hour_is_fast() -> None:
    # Zeros are allocated lazily, so the hour costs memory only where plan_chunks looks: its search windows.
    samples = np.zeros(RATE_HZ * 3600, dtype=np.float32)
    samples[::7919] = 0.01  # sparse clicks, so windows differ
    started = time.perf_counter()
    spans = plan_chunks(samples, max_chunk_s=30.0)
    elapsed_s = time.perf_counter() - started
    assert 120 <= len(spans) <= 130
    assert_exact_cover(spans, samples.shape[0], 30 * RATE_HZ)
    assert elapsed_s < 2.0  # measured ~0.1 s on a 2-core CPU


def test_pad_to_min() -> None:
    short = np.ones(100, dtype=np.float32)
    padded = pad_to_min(short)
    assert padded.shape == (8000,) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[:100], 1.0)
    np.testing.assert_array_equal(padded[100:], 0.0)
    long_enough = np.ones(8000, dtype=np.float32)
    assert pad_to_min(long_enough) is long_enough
    assert pad_to_min(short, min_s=1.0).shape == (16000,)


def test_span_times() -> None:
    span = ChunkSpan(16000, 40000)
    assert (span.start_ms, span.end_ms, span.length_samples) == (1000, 2500, 24000)
