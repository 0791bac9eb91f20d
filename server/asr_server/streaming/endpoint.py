"""Where utterances start and end, from per-frame speech probabilities. Pure logic: no audio, no model, no I/O.

Frames are the VAD's 32 ms frames, numbered from the stream's start; positions are 16 kHz sample indices.

- An utterance starts once `min_speech_ms` of frames at or above `speech_threshold` have been seen without a
  silence in between; its start is back-dated to the first of them, further back over the frames just before
  it whose probability is already rising (at or above 0.1, at most 8 frames: Silero scores a leading fricative
  such as the "s" of "streaming" low for a frame or three), less `start_pad_ms`.
- Inside an utterance a frame is silence only below `speech_threshold - 0.15` (Silero's own hysteresis), so a
  wobbling probability does not chop words. The utterance closes once silence has lasted `trailing_silence_ms`;
  it ends at the start of its last frame at or above `speech_threshold`, plus `end_pad_ms`.
- Speculation (`speculate_after_ms`, 0: off): once silence inside an open utterance has lasted that long (at most
  half the trailing silence), `pending_end` tells the span the utterance will get if the silence goes on to the
  endpoint, so its final can be decoded ahead; it is None again as soon as speech resumes (or the utterance ends).
- An utterance that reaches `max_utterance_ms` is closed at its quietest point in its second half (lowest
  energy over a 96 ms window; the later one on a tie), and the rest of it opens the next utterance at once.
Silero reacts about one frame late at both edges (measured on espeak-ng speech: its probability crosses 0.5
one to two frames after speech begins, and stays above it about one frame after speech ends). Hence the
32 ms start pad and the end at the START of the last speech frame (+16 ms): the boundaries then fall about
-35..+25 ms (start) and -20..+60 ms (end) from the true speech edges. The reported span is exactly the audio
that is decoded.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from asr_server.streaming.vad import FRAME_MS, FRAME_SAMPLES

_HYSTERESIS = 0.15
_ONSET_PROBABILITY = 0.1
_ONSET_FRAMES = 8
_QUIET_WINDOW_FRAMES = 3


@dataclass(frozen=True)
class EndpointSettings:
    trailing_silence_ms: int = 800
    max_utterance_ms: int = 30_000
    speech_threshold: float = 0.5
    min_speech_ms: int = 96
    start_pad_ms: int = 32
    end_pad_ms: int = 16
    # Silence after which `pending_end` is published (the session starts a speculative final); 0: never.
    speculate_after_ms: int = 0

    def __post_init__(self) -> None:
        # Built from validated requests and server config; a bad value here is a programming error.
        if not 0.0 < self.speech_threshold < 1.0:
            raise ValueError(f"speech_threshold must be in (0, 1), got {self.speech_threshold}")
        if self.max_utterance_ms < 4 * FRAME_MS or self.trailing_silence_ms < FRAME_MS:
            raise ValueError(f"endpoint settings too small: {self}")
        if self.speculate_after_ms < 0:
            raise ValueError(f"speculate_after_ms must be >= 0, got {self.speculate_after_ms}")

    @property
    def trailing_silence_frames(self) -> int:
        return max(1, -(-self.trailing_silence_ms // FRAME_MS))

    @property
    def speculate_after_frames(self) -> int:
        """Silent frames before `pending_end` shows, 0: never. At most half the trailing silence, so a stream with
        a short trailing silence (a voice bot's 200 ms) still gets its final ahead of the endpoint."""
        if self.speculate_after_ms <= 0:
            return 0
        wanted = max(1, -(-self.speculate_after_ms // FRAME_MS))
        return max(1, min(wanted, self.trailing_silence_frames // 2))

    @property
    def min_speech_frames(self) -> int:
        return max(1, -(-self.min_speech_ms // FRAME_MS))

    @property
    def max_utterance_samples(self) -> int:
        return self.max_utterance_ms * 16

    @property
    def start_pad_samples(self) -> int:
        return self.start_pad_ms * 16

    @property
    def end_pad_samples(self) -> int:
        return self.end_pad_ms * 16


@dataclass(frozen=True)
class SpeechStarted:
    sample: int


@dataclass(frozen=True)
class UtteranceEnded:
    start_sample: int
    end_sample: int
    # True when closed for reaching max_utterance_ms (the next utterance starts at end_sample at once).
    forced: bool = False


EndpointEvent = SpeechStarted | UtteranceEnded


class Endpointer:
    """Feed per-frame probabilities (and energies, for the quietest-point cut) in order; get events back."""

    def __init__(self, settings: EndpointSettings) -> None:
        self.settings = settings
        self._frame = 0  # index of the next frame
        self._floor = 0  # no utterance may start before this sample (the previous one's end)
        # Candidate start (not yet min_speech_frames of speech): first frame, speech frames seen, silent run.
        self._candidate: int | None = None
        self._candidate_speech = 0
        self._candidate_silence = 0
        self._recent: deque[float] = deque(maxlen=_ONSET_FRAMES)  # probabilities of the frames before this one
        # Open utterance: its start sample, the frame where the current silence began (None while speaking),
        # and the energies of its frames since `_energy_base` (bounded by max_utterance_ms).
        self._start: int | None = None
        self._silence_from: int | None = None
        self._last_speech = 0  # last frame at or above the threshold
        self._energies: list[float] = []
        self._energy_base = 0

    @property
    def open_start(self) -> int | None:
        """Start sample of the open utterance, or None."""
        return self._start

    @property
    def keep_from(self) -> int:
        """The earliest sample that the open or any future utterance can include: audio before it can go."""
        if self._start is not None:
            return self._start
        if self._candidate is not None:
            return self._back_dated(self._candidate)
        return self._back_dated(self._frame - len(self._recent))

    @property
    def pending_end(self) -> tuple[int, int] | None:
        """(start_sample, end_sample) the open utterance gets from its UtteranceEnded if the current silence lasts
        to the endpoint, once it has lasted `speculate_after_frames`; None while speaking, idle, or off.

        Exact by construction: push() closes the utterance on frame `_silence_from + trailing_silence_frames - 1`,
        i.e. with `_frame == _silence_from + trailing_silence_frames`, and ends it at
        `max(_speech_end(_frame), _start + FRAME_SAMPLES)`; `_start`, `_last_speech` and `_silence_from` only change
        on a speech frame (which clears this) or at a max-length cut (a forced end, never a match). So the value
        is computed here with the frame count the endpoint will have, not the current one (which matters only for
        an end pad of a frame or more, where the min() in _speech_end would still grow)."""
        frames = self.settings.speculate_after_frames
        if self._start is None or self._silence_from is None or not frames:
            return None
        if self._frame - self._silence_from < frames:
            return None
        at_endpoint = self._silence_from + self.settings.trailing_silence_frames
        return self._start, max(self._speech_end(at_endpoint), self._start + FRAME_SAMPLES)

    @property
    def frames_seen(self) -> int:
        return self._frame

    def _back_dated(self, frame: int) -> int:
        return max(self._floor, frame * FRAME_SAMPLES - self.settings.start_pad_samples)

    def push(
        self, probs: npt.NDArray[np.float32], energies: npt.NDArray[np.float32] | None = None
    ) -> list[EndpointEvent]:
        events: list[EndpointEvent] = []
        threshold = self.settings.speech_threshold
        low = threshold - _HYSTERESIS
        for i in range(probs.shape[0]):
            p = float(probs[i])
            frame = self._frame
            self._frame += 1
            if self._start is None:
                self._idle_frame(frame, p, threshold, low, events)
                self._recent.append(p)
                if self._start is None:
                    continue
                # Confirmed on this frame. Energies only matter for a cut in an utterance's second half, so the
                # few frames before confirmation get a neutral placeholder instead of being tracked while idle.
                self._energies = [1.0] * (frame - self._start // FRAME_SAMPLES)
                self._energy_base = self._start // FRAME_SAMPLES
            self._energies.append(float(energies[i]) if energies is not None else 1.0)
            if p >= threshold:
                self._silence_from = None
                self._last_speech = frame
            elif p < low and self._silence_from is None:
                self._silence_from = frame
            if (
                self._silence_from is not None
                and frame + 1 - self._silence_from >= self.settings.trailing_silence_frames
            ):
                end = max(self._speech_end(self._frame), self._start + FRAME_SAMPLES)
                events.append(UtteranceEnded(self._start, end))
                self._close(end)
                continue
            if self._frame * FRAME_SAMPLES - self._start >= self.settings.max_utterance_samples:
                events.extend(self._split())
        return events

    def _speech_end(self, frames: int) -> int:
        """Where the open utterance's speech ends, padded, within the first `frames` frames."""
        return min(self._last_speech * FRAME_SAMPLES + self.settings.end_pad_samples, frames * FRAME_SAMPLES)

    def _idle_frame(self, frame: int, p: float, threshold: float, low: float, events: list[EndpointEvent]) -> None:
        if self._candidate is None:
            if p >= threshold:
                onset = frame
                for earlier in reversed(self._recent):
                    if earlier < _ONSET_PROBABILITY:
                        break
                    onset -= 1
                self._candidate, self._candidate_speech, self._candidate_silence = onset, 1, 0
        elif p >= threshold:
            self._candidate_speech += 1
            self._candidate_silence = 0
        elif p < low:
            self._candidate_silence += 1
            if self._candidate_silence >= self.settings.min_speech_frames:
                self._candidate = None
        if self._candidate is not None and self._candidate_speech >= self.settings.min_speech_frames:
            self._start = self._back_dated(self._candidate)
            self._silence_from = None
            self._last_speech = frame
            self._candidate = None
            events.append(SpeechStarted(self._start))

    def _split(self) -> list[EndpointEvent]:
        """Closes the too-long open utterance at its quietest point in its second half; the rest stays open."""
        if self._start is None:
            return []
        start_frame = self._energy_base
        energies = np.asarray(self._energies, dtype=np.float64)
        if energies.shape[0] >= _QUIET_WINDOW_FRAMES:
            smooth = np.convolve(energies, np.ones(_QUIET_WINDOW_FRAMES) / _QUIET_WINDOW_FRAMES, mode="same")
        else:
            smooth = energies
        half = max(1, (self._frame - start_frame) // 2)
        window = smooth[half:]
        # The later of equally quiet frames: the cut leaves as little as possible of the next utterance open.
        quietest = half + int(window.shape[0] - 1 - np.argmin(window[::-1]))
        cut_frame = start_frame + quietest
        cut = max(cut_frame * FRAME_SAMPLES, self._start + FRAME_SAMPLES)
        cut_frame = -(-cut // FRAME_SAMPLES)
        ended = UtteranceEnded(self._start, cut, forced=True)
        self._energies = self._energies[cut_frame - start_frame :]
        self._energy_base = cut_frame
        self._floor = cut
        self._start = cut
        # The silence state of the remainder: restart it from the cut (speech is assumed to go on).
        if self._silence_from is not None and self._silence_from < cut_frame:
            self._silence_from = cut_frame
        self._last_speech = max(self._last_speech, cut_frame)
        return [ended, SpeechStarted(cut)]

    def _close(self, end: int) -> None:
        self._floor = end
        self._recent.clear()
        self._start = None
        self._silence_from = None
        self._energies = []
        self._candidate = None

    def flush(self, total_samples: int) -> UtteranceEnded | None:
        """End of the stream: closes the open utterance at the end of its speech (or of the audio)."""
        if self._start is None:
            return None
        if self._silence_from is not None:
            end = self._speech_end(self._frame)
        else:
            end = total_samples
        end = max(self._start + 1, min(end, total_samples))
        ended = UtteranceEnded(self._start, end)
        self._close(end)
        return ended
