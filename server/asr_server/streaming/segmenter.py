"""Endpointing for recorded audio (Transcribe / TranscribeStream with `endpointing` set): one segment per utterance.

The same VAD and endpointer as live streams, run over decoded 16 kHz audio, so a recorded call sent as one
upload comes back cut exactly where a live stream of it would have been cut. Each utterance is decoded with
Transcriber.decode_piece (all of them at once, so they batch), then aligned when word timestamps are asked for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from asr_server.audio.decode import DecodedAudio
from asr_server.errors import FailedPrecondition
from asr_server.results import (
    ChannelMode,
    ChannelTranscript,
    Segment,
    Timing,
    TranscriptionResult,
    Word,
    WordTimestampsStatus,
)
from asr_server.streaming.endpoint import Endpointer, EndpointSettings, UtteranceEnded
from asr_server.streaming.vad import FRAME_SAMPLES, VadBatcher, VadState
from asr_server.transcription import TranscribeOptions, Transcriber, merge_segments, samples_to_ms

# VAD runs over the recording in pieces of this many frames (~60 s), so a 4-hour file never becomes one array
# of windows (9x the audio's size).
_PIECE_FRAMES = 1875


async def utterance_spans(
    samples_16k: npt.NDArray[np.float32], settings: EndpointSettings, vad: VadBatcher
) -> list[tuple[int, int]]:
    """[start, end) sample spans of the utterances in `samples_16k`, in order."""
    state = VadState()
    endpointer = Endpointer(settings)
    spans: list[tuple[int, int]] = []
    step = _PIECE_FRAMES * FRAME_SAMPLES
    total = int(samples_16k.shape[0])
    for offset in range(0, total, step):
        piece = samples_16k[offset : offset + step]
        probs, energies = await vad.frames(state, piece)
        for event in endpointer.push(probs, energies):
            if isinstance(event, UtteranceEnded):
                spans.append((event.start_sample, event.end_sample))
    last = endpointer.flush(total)
    if last is not None:
        spans.append((last.start_sample, last.end_sample))
    return spans


async def transcribe_by_utterance(
    transcriber: Transcriber,
    vad: VadBatcher,
    audio: DecodedAudio,
    options: TranscribeOptions,
    settings: EndpointSettings,
    *,
    model_id: str,
) -> TranscriptionResult:
    started = time.perf_counter()
    if options.return_word_timestamps and not transcriber.has_aligner:
        raise FailedPrecondition(
            "return_word_timestamps needs the forced aligner, and this server runs without one; "
            "start it with --aligner-model (e.g. Qwen/Qwen3-ForcedAligner-0.6B-hf)"
        )
    channels: Sequence[npt.NDArray[np.float32]] = (
        audio.channels if options.channel_mode is ChannelMode.SEPARATE else [audio.downmix()]
    )
    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(_channel(transcriber, vad, index, samples, options, settings))
            for index, samples in enumerate(channels)
        ]
    outcomes = [t.result() for t in tasks]
    timing = Timing(
        total_ms=(time.perf_counter() - started) * 1000,
        queue_wait_ms=max((o[1] for o in outcomes), default=0.0),
        inference_ms=sum(o[2] for o in outcomes),
        alignment_ms=sum(o[3] for o in outcomes),
    )
    return TranscriptionResult(tuple(o[0] for o in outcomes), audio.duration_ms, model_id, timing)


async def _channel(
    transcriber: Transcriber,
    vad: VadBatcher,
    index: int,
    samples: npt.NDArray[np.float32],
    options: TranscribeOptions,
    settings: EndpointSettings,
) -> tuple[ChannelTranscript, float, float, float]:
    spans = await utterance_spans(samples, settings, vad)
    async with asyncio.TaskGroup() as group:
        decodes = [group.create_task(transcriber.decode_piece(samples[a:b], options)) for a, b in spans]
    results = [t.result() for t in decodes]
    aligned: list[tuple[tuple[Word, ...], WordTimestampsStatus, float]]
    if options.return_word_timestamps:
        async with asyncio.TaskGroup() as group:
            aligns = [
                group.create_task(transcriber.align_piece(samples[a:b], r.text, r.language, samples_to_ms(a)))
                for (a, b), r in zip(spans, results, strict=True)
            ]
        aligned = [t.result() for t in aligns]
    else:
        aligned = [((), WordTimestampsStatus.NOT_REQUESTED, 0.0) for _ in spans]
    segments = [
        Segment(samples_to_ms(a), samples_to_ms(b), r.text, r.language, words, status)
        for (a, b), r, (words, status, _) in zip(spans, results, aligned, strict=True)
    ]
    batch_ms = {r.batch.start_ns: r.inference_ms for r in results}
    return (
        merge_segments(index, segments, options.return_word_timestamps),
        max((r.queue_wait_ms for r in results), default=0.0),
        sum(batch_ms.values()),
        sum(a[2] for a in aligned),
    )
