"""The endpointer on synthetic per-frame probabilities: starts, ends, hysteresis, the max-length cut, flush."""

from __future__ import annotations

import numpy as np
import pytest

from asr_server.streaming.endpoint import Endpointer, EndpointSettings, SpeechStarted, UtteranceEnded
from asr_server.streaming.vad import FRAME_SAMPLES

F = FRAME_SAMPLES


def probs(*runs: tuple[float, int]) -> np.ndarray:
    """(probability, frames) runs -> per-frame probabilities."""
    return np.concatenate([np.full(n, p, dtype=np.float32) for p, n in runs])


def run(settings: EndpointSettings, p: np.ndarray, energies: np.ndarray | None = None, piece: int = 7) -> list[object]:
    endpointer = Endpointer(settings)
    events: list[object] = []
    for i in range(0, p.shape[0], piece):  # pieces of odd size: results must not depend on how frames arrive
        e = None if energies is None else energies[i : i + piece]
        events += endpointer.push(p[i : i + piece], e)
    last = endpointer.flush(p.shape[0] * F)
    if last is not None:
        events.append(last)
    return events


def test_one_utterance_with_pads_and_trailing_silence() -> None:
    settings = EndpointSettings(trailing_silence_ms=320)  # 10 frames
    events = run(settings, probs((0.0, 20), (0.9, 30), (0.0, 40)))
    assert events == [
        SpeechStarted(20 * F - 32 * 16),
        UtteranceEnded(20 * F - 32 * 16, 49 * F + 16 * 16),  # start of the last speech frame + 16 ms
    ]


def test_short_blips_and_dips_do_not_make_or_split_utterances() -> None:
    settings = EndpointSettings(trailing_silence_ms=320, min_speech_ms=96)
    # A 2-frame blip (< 96 ms) is ignored; a 5-frame dip inside speech (< 320 ms) does not close it; a value
    # between the thresholds (0.4) continues a silence but does not start one.
    p = probs((0.0, 10), (0.9, 2), (0.0, 10), (0.9, 20), (0.0, 5), (0.4, 3), (0.9, 20), (0.0, 30))
    events = run(settings, p)
    assert [type(e) for e in events] == [SpeechStarted, UtteranceEnded]
    assert events[1] == UtteranceEnded(22 * F - 512, (22 + 20 + 8 + 20 - 1) * F + 256)


def test_silence_between_thresholds_still_counts_once_started() -> None:
    settings = EndpointSettings(trailing_silence_ms=320)
    p = probs((0.9, 10), (0.2, 2), (0.4, 12), (0.0, 5))
    events = run(settings, p)
    ended = [e for e in events if isinstance(e, UtteranceEnded)]
    # Closed after 10 frames counted from the first frame below 0.35, not at the end of the stream.
    assert len(ended) == 1 and ended[0].end_sample == 9 * F + 256


def test_too_long_utterance_is_cut_at_its_quietest_point_in_the_second_half() -> None:
    settings = EndpointSettings(trailing_silence_ms=800, max_utterance_ms=3200)  # 100 frames
    n = 250
    p = np.full(n, 0.9, dtype=np.float32)
    energies = np.full(n, 1.0, dtype=np.float32)
    energies[80:83] = 0.01  # a quiet spot in the first utterance's second half
    energies[30:33] = 0.001  # quieter, but in the first half: not used
    events = run(settings, p, energies)
    ended = [e for e in events if isinstance(e, UtteranceEnded)]
    assert ended[0].forced and ended[0].start_sample == 0
    assert ended[0].end_sample == 81 * F  # centre of the 3-frame quiet spot
    # The rest continues as the next utterance from the cut, so nothing is lost or duplicated.
    assert ended[1].start_sample == ended[0].end_sample
    assert all(e.end_sample - e.start_sample <= settings.max_utterance_samples for e in ended)
    for a, b in zip(ended, ended[1:], strict=False):
        assert b.start_sample == a.end_sample
    assert ended[-1].end_sample == n * F


def test_flush_closes_the_open_utterance_at_the_end_of_the_audio() -> None:
    endpointer = Endpointer(EndpointSettings())
    assert endpointer.push(probs((0.0, 5), (0.9, 10))) == [SpeechStarted(5 * F - 512)]
    assert endpointer.flush(15 * F + 100) == UtteranceEnded(5 * F - 512, 15 * F + 100)
    assert endpointer.flush(15 * F + 100) is None


def test_an_utterance_never_starts_before_the_previous_one_ended() -> None:
    settings = EndpointSettings(trailing_silence_ms=100)  # 4 frames
    events = run(settings, probs((0.9, 10), (0.0, 4), (0.9, 10), (0.0, 10)))
    ended = [e for e in events if isinstance(e, UtteranceEnded)]
    assert len(ended) == 2 and ended[1].start_sample >= ended[0].end_sample


@pytest.mark.parametrize("bad", [{"speech_threshold": 0.0}, {"speech_threshold": 1.0}, {"max_utterance_ms": 10}])
def test_settings_are_checked(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        EndpointSettings(**bad)  # type: ignore[arg-type]


# ---- pending_end: the span a speculative final decodes ----


def _random_probs(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Runs of speech, silence and in-between values (hysteresis band), of lengths around the settings' scales."""
    out: list[np.ndarray] = []
    total = 0
    while total < frames:
        kind = rng.integers(4)
        n = int(rng.integers(1, 40))
        if kind == 0:
            p = rng.uniform(0.5, 1.0, n)
        elif kind == 1:
            p = rng.uniform(0.0, 0.35, n)
        elif kind == 2:
            p = rng.uniform(0.35, 0.5, n)
        else:
            p = rng.uniform(0.0, 1.0, n)
        out.append(p.astype(np.float32))
        total += n
    return np.concatenate(out)[:frames]


@pytest.mark.parametrize("seed", range(40))
def test_pending_end_is_the_span_the_endpoint_then_gives(seed: int) -> None:
    rng = np.random.default_rng(seed)
    settings = EndpointSettings(
        trailing_silence_ms=int(rng.integers(100, 1000)),
        max_utterance_ms=int(rng.choice([1_000, 3_000, 30_000])),
        end_pad_ms=int(rng.choice([0, 16, 32, 50, 100])),  # a pad of a frame or more: the min() in _speech_end
        speculate_after_ms=int(rng.integers(1, 600)),
    )
    p = _random_probs(rng, 3000)
    energies = rng.uniform(0.0, 1.0, p.shape[0]).astype(np.float32)
    endpointer = Endpointer(settings)
    seen: list[tuple[int, int]] = []  # pending_end after each frame since it appeared, with no speech in between
    checked = 0
    for i in range(p.shape[0]):
        for event in endpointer.push(p[i : i + 1], energies[i : i + 1]):
            if isinstance(event, UtteranceEnded) and not event.forced:
                # Speculation shows no later than the frame before the endpoint, and never changes until it.
                assert seen, f"no pending_end before {event}"
                assert set(seen) == {(event.start_sample, event.end_sample)}, (seen, event)
                checked += 1
            seen = []
        pending = endpointer.pending_end
        if pending is None:
            seen = []
        else:
            assert endpointer.open_start == pending[0]
            seen.append(pending)
    assert checked > 0


def test_pending_end_is_off_by_default_and_capped_at_half_the_trailing_silence() -> None:
    assert EndpointSettings().speculate_after_frames == 0
    assert EndpointSettings(trailing_silence_ms=800, speculate_after_ms=240).speculate_after_frames == 8
    assert EndpointSettings(trailing_silence_ms=200, speculate_after_ms=240).speculate_after_frames == 3  # 7 // 2
    endpointer = Endpointer(EndpointSettings(trailing_silence_ms=320))
    endpointer.push(probs((0.9, 10), (0.0, 9)))
    assert endpointer.open_start is not None and endpointer.pending_end is None


def test_pending_end_clears_when_speech_resumes() -> None:
    endpointer = Endpointer(EndpointSettings(trailing_silence_ms=320, speculate_after_ms=96))  # 10 and 3 frames
    endpointer.push(probs((0.9, 10), (0.0, 2)))
    assert endpointer.pending_end is None
    endpointer.push(probs((0.0, 1)))
    assert endpointer.pending_end == (0, 9 * F + 256)
    endpointer.push(probs((0.9, 1)))
    assert endpointer.pending_end is None
    endpointer.push(probs((0.0, 3)))
    assert endpointer.pending_end == (0, 13 * F + 256)
