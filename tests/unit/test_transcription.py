"""Transcriber timings: what the response's ServerTiming reports for a request split over channels and chunks."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from asr_server.audio.chunking import ChunkSpan
from asr_server.audio.decode import DecodedAudio
from asr_server.engine.types import BatchStats, DecodeRequest, DecodeResult
from asr_server.results import ChannelMode, Word
from asr_server.transcription import (
    AlignmentResult,
    TranscribeOptions,
    Transcriber,
    TranscriberLimits,
    union_ms,
)

_BATCH = BatchStats(batch_size=2, audio_s=2.0, generated_tokens=4, start_ns=1_000_000_000, end_ns=1_250_000_000)


def _stereo_second() -> DecodedAudio:
    channel = np.full(16_000, 0.1, dtype=np.float32)
    return DecodedAudio(
        channels=(channel, channel.copy()),
        source_sample_rate_hz=16_000,
        source_channel_count=2,
        source_frame_count=16_000,
    )


class OneBatchEngine:
    """Answers every piece as if all of them had shared one 250 ms batch."""

    model_id = "one-batch"

    async def decode(self, request: DecodeRequest) -> DecodeResult:
        return DecodeResult(request.request_id, "hello", "English", (1,), _BATCH.start_ns - 10_000_000, _BATCH)


async def test_a_batch_shared_by_two_channels_counts_once_in_inference_ms() -> None:
    audio = _stereo_second()
    transcriber = Transcriber(OneBatchEngine(), None, TranscriberLimits(max_chunk_s=30, max_chunk_with_timestamps_s=30))
    options = TranscribeOptions(language=None, context="", max_new_tokens=16, channel_mode=ChannelMode.SEPARATE)
    result = await transcriber.transcribe(audio, options)
    assert len(result.transcripts) == 2
    assert result.timing.inference_ms == 250.0
    assert result.timing.queue_wait_ms == 10.0


class StaggeredFirstTokens:
    """Reports a first token 80 ms after its first piece is submitted and 30 ms after its second."""

    model_id = "staggered"

    def __init__(self, report: bool) -> None:
        self.calls = 0
        self.report = report

    async def decode(self, request: DecodeRequest) -> DecodeResult:
        delay_ms = (80, 30)[self.calls % 2]
        self.calls += 1
        first_token_ns = time.time_ns() + delay_ms * 1_000_000 if self.report else 0
        return DecodeResult(request.request_id, "hello", "English", (1,), _BATCH.start_ns, _BATCH, first_token_ns)


async def test_first_token_ms_is_the_earliest_over_channels_and_unset_when_the_engine_does_not_report_it() -> None:
    audio = _stereo_second()
    options = TranscribeOptions(language=None, context="", max_new_tokens=16, channel_mode=ChannelMode.SEPARATE)
    limits = TranscriberLimits(max_chunk_s=30, max_chunk_with_timestamps_s=30)
    result = await Transcriber(StaggeredFirstTokens(report=True), None, limits).transcribe(audio, options)
    assert result.timing.first_token_ms is not None and 30.0 <= result.timing.first_token_ms < 75.0
    silent = await Transcriber(StaggeredFirstTokens(report=False), None, limits).transcribe(audio, options)
    assert silent.timing.first_token_ms is None


async def test_no_segment_ends_past_the_audio_a_2671_ms_file() -> None:
    # 2,671.5 ms at 16 kHz: rounding the span's end gave a segment ending at 2,672 ms, after the audio's end.
    samples = np.full(42_744, 0.1, dtype=np.float32)
    audio = DecodedAudio(channels=(samples,), source_sample_rate_hz=16_000, source_channel_count=1,
                         source_frame_count=42_744)
    transcriber = Transcriber(OneBatchEngine(), None, TranscriberLimits(max_chunk_s=30, max_chunk_with_timestamps_s=30))
    result = await transcriber.transcribe(audio, TranscribeOptions(language=None, context="", max_new_tokens=16))
    (transcript,) = result.transcripts
    assert result.audio_duration_ms == 2671
    assert transcript.segments[-1].end_ms == 2671


class TwoUtterances:
    """A span planner that cuts each channel into two utterances with a gap between them."""

    def __init__(self) -> None:
        self.planned: list[int] = []

    async def plan(self, samples_16k: np.ndarray) -> list[ChunkSpan]:
        self.planned.append(int(samples_16k.shape[0]))
        return [ChunkSpan(1_600, 6_400), ChunkSpan(9_600, 14_400)]


class RecordingEngine:
    model_id = "recording"

    def __init__(self) -> None:
        self.lengths: list[int] = []

    async def decode(self, request: DecodeRequest) -> DecodeResult:
        self.lengths.append(int(request.audio_16k.shape[0]))
        return DecodeResult(request.request_id, f"piece{len(self.lengths)}", "English", (1,), _BATCH.start_ns, _BATCH)


async def test_a_span_planner_decides_the_pieces_and_segments_of_each_channel() -> None:
    planner, engine = TwoUtterances(), RecordingEngine()
    transcriber = Transcriber(engine, None, TranscriberLimits(max_chunk_s=30, max_chunk_with_timestamps_s=30))
    options = TranscribeOptions(language=None, context="", max_new_tokens=16, channel_mode=ChannelMode.SEPARATE)
    result = await transcriber.transcribe(_stereo_second(), options, planner)
    assert planner.planned == [16_000, 16_000]
    # 4,800 samples each (0.3 s), padded to the model's 0.5 s minimum.
    assert engine.lengths == [8_000] * 4
    for transcript in result.transcripts:
        assert [(s.start_ms, s.end_ms) for s in transcript.segments] == [(100, 400), (600, 900)]
        assert len(transcript.segments) == 2 and transcript.text.count("piece") == 2


async def test_first_token_ms_is_reported_with_an_utterance_planner_too() -> None:
    # Endpointed requests went through a second pipeline that never reported it (0 on the wire).
    transcriber = Transcriber(StaggeredFirstTokens(report=True), None, TranscriberLimits(30, 30))
    options = TranscribeOptions(language=None, context="", max_new_tokens=16)
    result = await transcriber.transcribe(_stereo_second(), options, TwoUtterances())
    assert result.timing.first_token_ms is not None and 20 <= result.timing.first_token_ms <= 200


class TimedAligner:
    """Every alignment takes 200 ms of wall time, and they can run concurrently."""

    async def align(self, audio_16k: np.ndarray, text: str, language: str) -> AlignmentResult:
        await asyncio.sleep(0.2)
        return AlignmentResult((Word(text, 0, 100),), alignment_ms=200.0)


async def test_alignment_ms_is_wall_time_and_alignment_work_ms_the_sum_over_channels() -> None:
    audio = _stereo_second()
    transcriber = Transcriber(
        OneBatchEngine(), TimedAligner(), TranscriberLimits(max_chunk_s=30, max_chunk_with_timestamps_s=30)
    )
    options = TranscribeOptions(
        language=None, context="", max_new_tokens=16, return_word_timestamps=True, channel_mode=ChannelMode.SEPARATE
    )
    result = await transcriber.transcribe(audio, options)
    timing = result.timing
    assert timing.alignment_work_ms == 400.0  # two channels' alignments, added up
    # Both ran at once: the wall time is one alignment's, and never more than the request took.
    assert 195.0 <= timing.alignment_ms < 400.0
    assert timing.alignment_ms <= timing.total_ms
    assert timing.inference_wall_ms == timing.inference_ms == 250.0  # one shared batch


def test_union_ms_counts_overlaps_once() -> None:
    ms = 1_000_000
    assert union_ms([]) == 0.0
    assert union_ms([(0, 10 * ms), (5 * ms, 20 * ms), (30 * ms, 31 * ms), (2 * ms, 3 * ms)]) == 21.0
