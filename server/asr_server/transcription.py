"""From decoded audio to a transcript: channels, chunks, the engine, the aligner, the merge.

Pure asyncio over two small interfaces (an engine that decodes one piece of audio, an aligner that times
the words of one piece), so it runs the same against the model, the fake engine or a test double.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from asr_server.audio.chunking import pad_to_min, plan_chunks
from asr_server.audio.decode import DecodedAudio
from asr_server.engine.types import SAMPLE_RATE_HZ, DecodeOptions, DecodeRequest, DecodeResult
from asr_server.errors import FailedPrecondition
from asr_server.languages import aligner_supports
from asr_server.results import (
    ChannelMode,
    ChannelTranscript,
    Segment,
    Timing,
    TranscriptionResult,
    Word,
    WordTimestampsStatus,
)
from asr_server.transcript_merge import join_texts, merge_languages

_MIN_CHUNK_S = 0.5
_tracer = trace.get_tracer("asr_server.transcription")


class DecodeBackend(Protocol):
    @property
    def model_id(self) -> str: ...

    async def decode(self, request: DecodeRequest) -> DecodeResult: ...


@dataclass(frozen=True)
class AlignmentResult:
    words: tuple[Word, ...]  # times relative to the start of the audio that was aligned
    alignment_ms: float


class AlignBackend(Protocol):
    async def align(self, audio_16k: npt.NDArray[np.float32], text: str, language: str) -> AlignmentResult: ...


@dataclass(frozen=True)
class TranscribeOptions:
    language: str | None
    context: str
    max_new_tokens: int
    return_word_timestamps: bool = False
    channel_mode: ChannelMode = ChannelMode.DOWNMIX


@dataclass(frozen=True)
class TranscriberLimits:
    max_chunk_s: float
    max_chunk_with_timestamps_s: float


def samples_to_ms(samples: int) -> int:
    return int(round(samples * 1000 / SAMPLE_RATE_HZ))


def record_engine_spans(result: DecodeResult, audio_s: float) -> None:
    """Child spans of the current (RPC) span for one piece of audio: its queue wait and its engine batch."""
    batch = result.batch
    wait = _tracer.start_span("asr.queue_wait", start_time=result.enqueued_ns)
    wait.set_attribute("asr.audio_s", audio_s)
    wait.end(end_time=max(result.enqueued_ns, batch.start_ns))
    span = _tracer.start_span("asr.engine_batch", start_time=batch.start_ns)
    span.set_attribute("asr.batch.size", batch.batch_size)
    span.set_attribute("asr.batch.audio_s", batch.audio_s)
    span.set_attribute("asr.batch.generated_tokens", batch.generated_tokens)
    span.set_attribute("asr.request.audio_s", audio_s)
    span.set_attribute("asr.request.generated_tokens", len(result.token_ids))
    span.end(end_time=batch.end_ns)


class Transcriber:
    def __init__(self, engine: DecodeBackend, aligner: AlignBackend | None, limits: TranscriberLimits) -> None:
        self._engine = engine
        self._aligner = aligner
        self._limits = limits

    @property
    def has_aligner(self) -> bool:
        return self._aligner is not None

    async def decode_piece(
        self, audio_16k: npt.NDArray[np.float32], options: TranscribeOptions, *, prefix_text: str = ""
    ) -> DecodeResult:
        """One piece of audio through the engine, padded to the model's 0.5 s minimum, with its spans."""
        padded = pad_to_min(audio_16k, min_s=_MIN_CHUNK_S)
        request = DecodeRequest(
            request_id=uuid.uuid4().hex,
            audio_16k=padded,
            options=DecodeOptions(options.language, options.context, options.max_new_tokens),
            prefix_text=prefix_text,
        )
        result = await self._engine.decode(request)
        record_engine_spans(result, request.audio_s)
        return result

    async def align_piece(
        self, audio_16k: npt.NDArray[np.float32], text: str, language: str, offset_ms: int
    ) -> tuple[tuple[Word, ...], WordTimestampsStatus, float]:
        if self._aligner is None:
            raise FailedPrecondition("word timestamps need the forced aligner; start the server with --aligner-model")
        if not text.strip():
            return (), WordTimestampsStatus.NO_TEXT, 0.0
        # A detected "Chinese,English" piece is aligned when its first language is covered.
        first = language.split(",")[0] if language else ""
        if not first or not aligner_supports(first):
            return (), WordTimestampsStatus.LANGUAGE_NOT_SUPPORTED, 0.0
        with _tracer.start_as_current_span("asr.align") as span:
            span.set_attribute("asr.audio_s", audio_16k.shape[0] / SAMPLE_RATE_HZ)
            aligned = await self._aligner.align(audio_16k, text, first)
        duration_ms = samples_to_ms(audio_16k.shape[0])
        words = tuple(
            Word(w.text, min(w.start_ms, duration_ms), min(max(w.end_ms, w.start_ms), duration_ms)).shifted(offset_ms)
            for w in aligned.words
        )
        return words, WordTimestampsStatus.OK, aligned.alignment_ms

    async def transcribe(self, audio: DecodedAudio, options: TranscribeOptions) -> TranscriptionResult:
        started = time.perf_counter()
        started_ns = time.time_ns()
        if options.return_word_timestamps and self._aligner is None:
            raise FailedPrecondition(
                "return_word_timestamps needs the forced aligner, and this server runs without one; "
                "start it with --aligner-model (e.g. Qwen/Qwen3-ForcedAligner-0.6B-hf)"
            )
        if options.channel_mode is ChannelMode.SEPARATE:
            channels: Sequence[npt.NDArray[np.float32]] = audio.channels
        else:
            channels = [audio.downmix()]
        max_chunk_s = (
            self._limits.max_chunk_with_timestamps_s if options.return_word_timestamps else self._limits.max_chunk_s
        )
        # Every chunk of every channel goes to the engine at once, so they batch with each other.
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self._transcribe_channel(index, samples, options, max_chunk_s))
                for index, samples in enumerate(channels)
            ]
        outcomes = [t.result() for t in tasks]
        transcripts = tuple(o[0] for o in outcomes)
        # Channels' chunks share batches too: count each batch's time once over the whole request.
        batch_ms = {start_ns: ms for o in outcomes for start_ns, ms in o[2].items()}
        first_token_ns = [o[4] for o in outcomes if o[4] > 0]
        timing = Timing(
            total_ms=(time.perf_counter() - started) * 1000,
            queue_wait_ms=max((o[1] for o in outcomes), default=0.0),
            inference_ms=sum(batch_ms.values()),
            alignment_ms=sum(o[3] for o in outcomes),
            first_token_ms=max(0.0, (min(first_token_ns) - started_ns) / 1e6) if first_token_ns else None,
        )
        return TranscriptionResult(transcripts, audio.duration_ms, self._engine.model_id, timing)

    async def _transcribe_channel(
        self, channel_index: int, samples: npt.NDArray[np.float32], options: TranscribeOptions, max_chunk_s: float
    ) -> tuple[ChannelTranscript, float, dict[int, float], float, int]:
        """The channel's transcript, its longest queue wait, its batches' times by batch start, its alignment time,
        and when its first token was generated (0: not reported)."""
        spans = plan_chunks(samples, max_chunk_s=max_chunk_s)
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self.decode_piece(samples[s.start_sample : s.end_sample], options)) for s in spans
            ]
        results = [t.result() for t in tasks]
        segments: list[Segment] = []
        alignment_ms = 0.0
        if options.return_word_timestamps:
            async with asyncio.TaskGroup() as group:
                align_tasks = [
                    group.create_task(
                        self.align_piece(
                            samples[s.start_sample : s.end_sample], r.text, r.language, samples_to_ms(s.start_sample)
                        )
                    )
                    for s, r in zip(spans, results, strict=True)
                ]
            aligned = [t.result() for t in align_tasks]
        else:
            aligned = [((), WordTimestampsStatus.NOT_REQUESTED, 0.0) for _ in spans]
        for span, result, (words, status, align_ms) in zip(spans, results, aligned, strict=True):
            alignment_ms += align_ms
            segments.append(
                Segment(
                    start_ms=samples_to_ms(span.start_sample),
                    end_ms=samples_to_ms(span.end_sample),
                    text=result.text,
                    language=result.language,
                    words=words,
                    word_timestamps_status=status,
                )
            )
        transcript = merge_segments(channel_index, segments, options.return_word_timestamps)
        batch_ms = {r.batch.start_ns: r.inference_ms for r in results}
        first_token_ns = min((r.first_token_ns for r in results if r.first_token_ns > 0), default=0)
        return transcript, max((r.queue_wait_ms for r in results), default=0.0), batch_ms, alignment_ms, first_token_ns


def merge_segments(channel_index: int, segments: Sequence[Segment], timestamps_requested: bool) -> ChannelTranscript:
    words = tuple(w for s in segments for w in s.words)
    if not timestamps_requested:
        status = WordTimestampsStatus.NOT_REQUESTED
    elif words:
        status = WordTimestampsStatus.OK
    elif any(s.word_timestamps_status is WordTimestampsStatus.LANGUAGE_NOT_SUPPORTED for s in segments):
        status = WordTimestampsStatus.LANGUAGE_NOT_SUPPORTED
    else:
        status = WordTimestampsStatus.NO_TEXT
    return ChannelTranscript(
        channel_index=channel_index,
        text=join_texts([s.text for s in segments], [s.language for s in segments]),
        language=merge_languages([s.language for s in segments]),
        words=words,
        segments=tuple(segments),
        word_timestamps_status=status,
    )
