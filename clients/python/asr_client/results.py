"""Results shaped like the reference `qwen_asr` library's: `ASRTranscription` with `.language`, `.text` and
`.time_stamps` (items with `.text`, `.start_time`, `.end_time` in seconds), built from the protobuf responses."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

from qwenasr.v1 import asr_pb2 as pb


@dataclass(frozen=True)
class ForcedAlignItem:
    """A word (a character for Chinese, Japanese and Cantonese) and its time span in seconds."""

    text: str
    start_time: float
    end_time: float


@dataclass(frozen=True)
class ForcedAlignResult(Sequence[ForcedAlignItem]):
    """The timed words of one transcription; iterate it, index it, or read `.items`."""

    items: list[ForcedAlignItem] = field(default_factory=list)

    def __iter__(self) -> Iterator[ForcedAlignItem]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> ForcedAlignItem: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[ForcedAlignItem]: ...

    def __getitem__(self, index: int | slice) -> ForcedAlignItem | Sequence[ForcedAlignItem]:
        return self.items[index]


@dataclass(frozen=True)
class Segment:
    """A piece of the audio decoded on its own (a chunk of long audio), times in seconds."""

    start_time: float
    end_time: float
    text: str
    language: str
    language_code: str = ""  # BCP-47, e.g. "en"
    confidence: float = 0.0  # mean token probability in [0, 1]; 0: unknown


@dataclass(frozen=True)
class ASRTranscription:
    """One result per audio input, as `qwen_asr.Qwen3ASRModel.transcribe` returns them.

    `language` is e.g. "English", "Chinese,English" when it changes, or "" when no speech was found;
    `language_code` the same as BCP-47 codes ("en", "zh,en"; a server older than that field sends "").
    `confidence` is the model's mean token probability over the text, in [0, 1] (0: unknown).
    `time_stamps` is set only when asked for (`return_time_stamps=True`); it is empty when the aligner does not
    cover the language or nothing was recognised. `segments`, `duration` (seconds) and `channel_index` (with
    ``channel_mode="separate"``: the channel this result is of; else 0) are extras of this client.
    """

    language: str
    text: str
    time_stamps: ForcedAlignResult | None = None
    segments: list[Segment] = field(default_factory=list)
    duration: float = 0.0
    channel_index: int = 0
    language_code: str = ""
    confidence: float = 0.0


@dataclass(frozen=True)
class StreamingResult:
    """An interim or final result of live recognition (`AsrClient.stream`); times in seconds from the start."""

    is_final: bool
    text: str
    language: str
    utterance_index: int
    channel_index: int
    start_time: float
    end_time: float
    stability: float
    time_stamps: ForcedAlignResult | None = None
    processed_time: float = 0.0
    language_code: str = ""  # BCP-47, e.g. "en"
    confidence: float = 0.0  # mean token probability in [0, 1]; 0: unknown


def seconds(ms: int) -> float:
    return round(ms / 1000.0, 3)


def align_result(words: Iterable[pb.Word]) -> ForcedAlignResult:
    return ForcedAlignResult([ForcedAlignItem(w.text, seconds(w.start_ms), seconds(w.end_ms)) for w in words])


def transcription_from_pb(response: pb.TranscribeResponse, *, time_stamps: bool) -> ASRTranscription:
    """The downmix (or first channel's) transcript of a response."""
    duration = seconds(response.audio_duration_ms)
    if not response.transcripts:
        return ASRTranscription("", "", ForcedAlignResult() if time_stamps else None, [], duration)
    return _transcription(response.transcripts[0], duration, time_stamps=time_stamps)


def transcriptions_from_pb(
    responses: Sequence[pb.TranscribeResponse], *, channel_mode: str, time_stamps: bool
) -> list[ASRTranscription] | list[list[ASRTranscription]]:
    """What `transcribe` returns for its responses: one result per input, or with channel_mode "separate" one
    list of per-channel results per input."""
    if channel_mode == "separate":
        return [channel_transcriptions_from_pb(r, time_stamps=time_stamps) for r in responses]
    return [transcription_from_pb(r, time_stamps=time_stamps) for r in responses]


def channel_transcriptions_from_pb(response: pb.TranscribeResponse, *, time_stamps: bool) -> list[ASRTranscription]:
    """One result per channel of a CHANNEL_MODE_SEPARATE response, in channel order."""
    duration = seconds(response.audio_duration_ms)
    return [_transcription(t, duration, time_stamps=time_stamps) for t in response.transcripts]


def _transcription(transcript: pb.Transcript, duration: float, *, time_stamps: bool) -> ASRTranscription:
    segments = [
        Segment(seconds(s.start_ms), seconds(s.end_ms), s.text, s.language, s.language_code, s.confidence)
        for s in transcript.segments
    ]
    return ASRTranscription(
        language=transcript.language,
        text=transcript.text,
        time_stamps=align_result(transcript.words) if time_stamps else None,
        segments=segments,
        duration=duration,
        channel_index=transcript.channel_index,
        language_code=transcript.language_code,
        confidence=transcript.confidence,
    )


def streaming_result_from_pb(response: pb.StreamingRecognizeResponse, *, time_stamps: bool) -> StreamingResult:
    result = response.result
    return StreamingResult(
        is_final=result.is_final,
        text=result.text,
        language=result.language,
        utterance_index=result.utterance_index,
        channel_index=result.channel_index,
        start_time=seconds(result.start_ms),
        end_time=seconds(result.end_ms),
        stability=result.stability,
        time_stamps=align_result(result.words) if time_stamps and result.is_final else None,
        processed_time=seconds(response.processed_audio_ms),
        language_code=result.language_code,
        confidence=result.confidence,
    )
