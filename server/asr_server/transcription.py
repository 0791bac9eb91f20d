"""From decoded audio to a transcript: channels -> spans -> decode -> align -> segments -> merge -> timing.

One pipeline for every recorded-audio RPC. Only the span planner differs: fixed chunks cut at silences
(`FixedChunks`, the default) or VAD utterances (streaming/segmenter.py's `UtterancePlanner` for endpointing).
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

from asr_server.audio.chunking import ChunkSpan, pad_to_min, plan_chunks
from asr_server.audio.decode import DecodedAudio
from asr_server.audio.formats import MODEL_SAMPLE_RATE_HZ, samples_to_ms
from asr_server.engine.types import DecodeOptions, DecodePriority, DecodeRequest, DecodeResult
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
from asr_server.word_confidence import word_confidences

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


class SpanPlanner(Protocol):
    """Where one channel's 16 kHz audio is cut into pieces decoded on their own: [start, end) sample spans, in
    order, non-overlapping (gaps allowed: silence between utterances is not decoded)."""

    async def plan(self, samples_16k: npt.NDArray[np.float32]) -> Sequence[ChunkSpan]: ...


@dataclass(frozen=True)
class FixedChunks:
    """Chunks of at most max_chunk_s, cut at the quietest 100 ms near each nominal cut (the reference library's
    long-audio rule); audio up to max_chunk_s is one chunk."""

    max_chunk_s: float

    async def plan(self, samples_16k: npt.NDArray[np.float32]) -> Sequence[ChunkSpan]:
        return plan_chunks(samples_16k, max_chunk_s=self.max_chunk_s)


@dataclass(frozen=True)
class AlignedPiece:
    """Word timestamps of one piece: words shifted to the channel's time line, why there are none, work done."""

    words: tuple[Word, ...]
    status: WordTimestampsStatus
    alignment_ms: float
    # When the aligner call ran (time.time_ns), for the request's wall time; None: no alignment ran.
    span_ns: tuple[int, int] | None = None


_NOT_REQUESTED = AlignedPiece((), WordTimestampsStatus.NOT_REQUESTED, 0.0)


@dataclass(frozen=True)
class _ChannelOutcome:
    transcript: ChannelTranscript
    queue_wait_ms: float  # the longest of its pieces
    # Batch time by batch start (time.time_ns): pieces of one request share batches, so each counts once.
    batch_ms_by_start_ns: dict[int, float]
    alignment_ms: float  # summed over its pieces
    alignment_spans_ns: list[tuple[int, int]]
    first_token_ns: int  # the earliest of its pieces; 0: not reported


def require_aligner(options: TranscribeOptions, has_aligner: bool) -> None:
    """The one check, for every RPC, that word timestamps can be served before any work starts."""
    if options.return_word_timestamps and not has_aligner:
        raise FailedPrecondition(
            "return_word_timestamps needs the forced aligner, and this server runs without one; "
            "start it with --aligner-model (e.g. Qwen/Qwen3-ForcedAligner-0.6B-hf)"
        )


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

    def fixed_chunks(self, options: TranscribeOptions) -> FixedChunks:
        """The default planner: the configured chunk length (shorter when word timestamps are asked for)."""
        limits = self._limits
        return FixedChunks(limits.max_chunk_with_timestamps_s if options.return_word_timestamps else limits.max_chunk_s)

    async def decode_piece(
        self,
        audio_16k: npt.NDArray[np.float32],
        options: TranscribeOptions,
        *,
        prefix_text: str = "",
        priority: DecodePriority = DecodePriority.NORMAL,
        stream_key: str | None = None,
        draft_token_ids: tuple[int, ...] = (),
    ) -> DecodeResult:
        """One piece of audio through the engine, padded to the model's 0.5 s minimum, with its spans.
        `stream_key`: a live utterance's key, on its interims and its final (DecodeRequest.stream_key);
        `draft_token_ids`: what the output is expected to start with (DecodeRequest.draft_token_ids)."""
        padded = pad_to_min(audio_16k, min_s=_MIN_CHUNK_S)
        request = DecodeRequest(
            request_id=uuid.uuid4().hex,
            audio_16k=padded,
            options=DecodeOptions(options.language, options.context, options.max_new_tokens),
            prefix_text=prefix_text,
            priority=priority,
            stream_key=stream_key,
            draft_token_ids=draft_token_ids,
        )
        result = await self._engine.decode(request)
        record_engine_spans(result, request.audio_s)
        return result

    async def align_piece(
        self,
        audio_16k: npt.NDArray[np.float32],
        text: str,
        language: str,
        offset_ms: int,
        *,
        decoded: DecodeResult | None = None,
    ) -> AlignedPiece:
        """The words of `text` timed in this piece, shifted by `offset_ms`; `decoded`, the decode that wrote the text,
        gives each word its confidence (none for a caller's own text: Align)."""
        if self._aligner is None:
            raise FailedPrecondition("word timestamps need the forced aligner; start the server with --aligner-model")
        if not text.strip():
            return AlignedPiece((), WordTimestampsStatus.NO_TEXT, 0.0)
        # A detected "Chinese,English" piece is aligned when its first language is covered. Text with no language
        # detected is aligned too, as both references do (transformers' split_words_for_alignment(text, None),
        # qwen-asr's default tokenizer): CJK per character, other scripts on spaces. Only a known language outside
        # the aligner's 11 has no words: LANGUAGE_NOT_SUPPORTED then means just that.
        first = language.split(",")[0].strip() if language else ""
        if first and not aligner_supports(first):
            return AlignedPiece((), WordTimestampsStatus.LANGUAGE_NOT_SUPPORTED, 0.0)
        started_ns = time.time_ns()
        with _tracer.start_as_current_span("asr.align") as span:
            span.set_attribute("asr.audio_s", audio_16k.shape[0] / MODEL_SAMPLE_RATE_HZ)
            aligned = await self._aligner.align(audio_16k, text, first)
        span_ns = (started_ns, time.time_ns())
        duration_ms = samples_to_ms(audio_16k.shape[0])
        words = tuple(
            Word(w.text, min(w.start_ms, duration_ms), min(max(w.end_ms, w.start_ms), duration_ms)).shifted(offset_ms)
            for w in aligned.words
        )
        if decoded is not None:
            words = word_confidences(words, decoded.text_token_pieces, decoded.text_token_probs)
        return AlignedPiece(words, WordTimestampsStatus.OK, aligned.alignment_ms, span_ns)

    async def transcribe(
        self, audio: DecodedAudio, options: TranscribeOptions, planner: SpanPlanner | None = None
    ) -> TranscriptionResult:
        """Each channel (or the downmix) cut by `planner` (default: fixed chunks), decoded, aligned, merged."""
        started = time.perf_counter()
        started_ns = time.time_ns()
        require_aligner(options, self.has_aligner)
        if options.channel_mode is ChannelMode.SEPARATE:
            channels: Sequence[npt.NDArray[np.float32]] = audio.channels
        else:
            channels = [audio.downmix()]
        chosen = planner if planner is not None else self.fixed_chunks(options)
        # Every piece of every channel goes to the engine at once, so they batch with each other.
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self._transcribe_channel(index, samples, options, chosen))
                for index, samples in enumerate(channels)
            ]
        outcomes = [t.result() for t in tasks]
        # Channels' pieces share batches too: count each batch's time once over the whole request.
        batch_ms = {start_ns: ms for o in outcomes for start_ns, ms in o.batch_ms_by_start_ns.items()}
        first_token_ns = [o.first_token_ns for o in outcomes if o.first_token_ns > 0]
        timing = Timing(
            total_ms=(time.perf_counter() - started) * 1000,
            queue_wait_ms=max((o.queue_wait_ms for o in outcomes), default=0.0),
            inference_ms=sum(batch_ms.values()),
            inference_wall_ms=union_ms([(start, start + int(ms * 1e6)) for start, ms in batch_ms.items()]),
            # Wall time: pieces and channels align concurrently, so their sum can exceed total_ms.
            alignment_ms=union_ms([s for o in outcomes for s in o.alignment_spans_ns]),
            alignment_work_ms=sum(o.alignment_ms for o in outcomes),
            first_token_ms=max(0.0, (min(first_token_ns) - started_ns) / 1e6) if first_token_ns else None,
        )
        return TranscriptionResult(
            tuple(o.transcript for o in outcomes), audio.duration_ms, self._engine.model_id, timing
        )

    async def _transcribe_channel(
        self, channel_index: int, samples: npt.NDArray[np.float32], options: TranscribeOptions, planner: SpanPlanner
    ) -> _ChannelOutcome:
        spans = await planner.plan(samples)
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self.decode_piece(samples[s.start_sample : s.end_sample], options)) for s in spans
            ]
        results = [t.result() for t in tasks]
        aligned: list[AlignedPiece]
        if options.return_word_timestamps:
            async with asyncio.TaskGroup() as group:
                align_tasks = [
                    group.create_task(
                        self.align_piece(
                            samples[s.start_sample : s.end_sample], r.text, r.language, s.start_ms, decoded=r
                        )
                    )
                    for s, r in zip(spans, results, strict=True)
                ]
            aligned = [t.result() for t in align_tasks]
        else:
            aligned = [_NOT_REQUESTED for _ in spans]
        segments = [
            Segment(
                start_ms=span.start_ms,
                end_ms=span.end_ms,
                text=result.text,
                language=result.language,
                words=piece.words,
                word_timestamps_status=piece.status,
                token_probs=result.text_token_probs,
            )
            for span, result, piece in zip(spans, results, aligned, strict=True)
        ]
        return _ChannelOutcome(
            transcript=merge_segments(channel_index, segments, options.return_word_timestamps),
            queue_wait_ms=max((r.queue_wait_ms for r in results), default=0.0),
            batch_ms_by_start_ns={r.batch.start_ns: r.inference_ms for r in results},
            alignment_ms=sum(p.alignment_ms for p in aligned),
            alignment_spans_ns=[p.span_ns for p in aligned if p.span_ns is not None],
            first_token_ns=min((r.first_token_ns for r in results if r.first_token_ns > 0), default=0),
        )


def union_ms(spans_ns: Sequence[tuple[int, int]]) -> float:
    """How long at least one of the [start, end) spans (time.time_ns) was running, in ms: overlaps count once."""
    total_ns = 0
    reach = None
    for start, end in sorted(spans_ns):
        if reach is None or start > reach:
            total_ns += end - start
            reach = end
        elif end > reach:
            total_ns += end - reach
            reach = end
    return total_ns / 1e6


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
