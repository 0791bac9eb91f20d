"""Domain values of recognition results. The edge turns these into protobuf; nothing here knows protobuf."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class WordTimestampsStatus(enum.Enum):
    NOT_REQUESTED = "not_requested"
    OK = "ok"
    LANGUAGE_NOT_SUPPORTED = "language_not_supported"
    NO_TEXT = "no_text"


class ChannelMode(enum.Enum):
    DOWNMIX = "downmix"
    SEPARATE = "separate"


@dataclass(frozen=True)
class Word:
    text: str
    start_ms: int
    end_ms: int
    # Mean probability of the decoder tokens the word was spelled with (word_confidence.py); 0.0: unknown.
    confidence: float = 0.0

    def shifted(self, offset_ms: int) -> Word:
        return Word(self.text, self.start_ms + offset_ms, self.end_ms + offset_ms, self.confidence)


def mean_probability(probs: tuple[float, ...]) -> float:
    """A result's confidence: the arithmetic mean of its text tokens' probabilities; 0.0 for none (unknown)."""
    return sum(probs) / len(probs) if probs else 0.0


@dataclass(frozen=True)
class Segment:
    start_ms: int
    end_ms: int
    text: str
    language: str
    words: tuple[Word, ...] = ()
    word_timestamps_status: WordTimestampsStatus = WordTimestampsStatus.NOT_REQUESTED
    # The probability the model gave each token that spells `text` (DecodeResult.text_token_probs).
    token_probs: tuple[float, ...] = ()

    @property
    def confidence(self) -> float:
        return mean_probability(self.token_probs)


@dataclass(frozen=True)
class ChannelTranscript:
    channel_index: int
    text: str
    language: str
    words: tuple[Word, ...]
    segments: tuple[Segment, ...]
    word_timestamps_status: WordTimestampsStatus

    @property
    def confidence(self) -> float:
        """The mean over every text token of every segment (a long segment weighs more than a short one)."""
        return mean_probability(tuple(p for s in self.segments for p in s.token_probs))


@dataclass(frozen=True)
class Timing:
    total_ms: float = 0.0
    audio_decode_ms: float = 0.0
    queue_wait_ms: float = 0.0
    inference_ms: float = 0.0  # summed work: each engine batch that carried a piece, once
    alignment_ms: float = 0.0  # wall time: while at least one of the request's alignments was in flight
    alignment_work_ms: float = 0.0  # summed work: every alignment's own time, added up over pieces and channels
    inference_wall_ms: float = 0.0  # wall time: while at least one engine batch carrying a piece ran
    # From the audio's hand-over to the engine to its first generated token (earliest chunk); None: not reported.
    first_token_ms: float | None = None


@dataclass(frozen=True)
class TranscriptionResult:
    transcripts: tuple[ChannelTranscript, ...]
    audio_duration_ms: int
    model_id: str
    timing: Timing = field(default_factory=Timing)
