"""StreamingSession in-process (no gRPC): the real Silero VAD and Transcriber over the fake engine.

The long-stream test is the guard against anything growing with the stream's length: a 2-hour stream of
repeated espeak-ng sentences, fed far faster than real time, must hold flat memory and cost the same per
utterance at its end as at its start. Its work is counted, not timed: every piece's decodes are answered before
the next piece is fed, so the counts depend on the audio alone (the same counts on a short stream, without the
engine thread: tests/unit/test_streaming_interims.py).
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections import deque
from collections.abc import Callable

import numpy as np
import pytest

from asr_server.audio.formats import AudioFormat, AudioLimits, Encoding
from asr_server.engine.fake import FakeEngine
from asr_server.engine.runner import BatchingPolicy, EngineRunner
from asr_server.engine.types import DecodeRequest
from asr_server.streaming.endpoint import EndpointSettings
from asr_server.streaming.prefix import FakeTokenDecoder
from asr_server.streaming.session import StreamingOptions, StreamingSession, StreamResult, UtteranceWork
from asr_server.streaming.vad import EnergyVad, VadBatcher
from asr_server.transcription import TranscribeOptions, Transcriber, TranscriberLimits
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import CountingEngine, pcm16

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

LINEAR16 = AudioFormat(Encoding.LINEAR16, 16000, 1)
LIMITS = AudioLimits(max_audio_duration_s=4 * 3600, max_message_bytes=64 << 20, max_stream_bytes=1 << 31)


async def fake_transcriber(on_step: Callable[[list[DecodeRequest]], None] | None = None) -> EngineRunner:
    runner = EngineRunner(lambda: FakeEngine(max_batch_size=32, on_step=on_step), BatchingPolicy(32, 0.0, 4096))
    await runner.start()
    return runner


def options(**kw: object) -> StreamingOptions:
    return StreamingOptions(
        transcribe=TranscribeOptions(language=None, context="", max_new_tokens=4096),
        endpoint=EndpointSettings(),
        **kw,  # type: ignore[arg-type]
    )


async def test_a_two_hour_stream_has_flat_memory_and_flat_work_per_utterance() -> None:
    # One 71 s block of 12 sentences, repeated for 2 hours.
    sentences = [
        "Hello there, how are you today?",
        "The quick brown fox jumps over the lazy dog.",
        "Streaming recognition is fun.",
        "Please call Stella and ask her to bring these things with her from the store.",
        "Six spoons of fresh snow peas, five thick slabs of blue cheese.",
        "We also need a small plastic snake and a big toy frog for the kids.",
    ] * 2
    block, _ = synthesize_sentences(sentences, silence_s=1.0)
    # Whole VAD frames per block, so every block is cut exactly alike and utterances compare one to one.
    block = np.pad(block, (0, -block.shape[0] % 512))
    block_bytes = pcm16(block)
    total_s = 2 * 3600
    blocks = int(np.ceil(total_s * 16000 / block.shape[0]))

    max_request_s = 0.0

    def on_step(requests: list[DecodeRequest]) -> None:
        nonlocal max_request_s
        max_request_s = max([max_request_s] + [r.audio_s for r in requests])

    cores: list[FakeEngine] = []

    def make_core() -> FakeEngine:
        cores.append(FakeEngine(max_batch_size=32, on_step=on_step))
        return cores[-1]

    runner = EngineRunner(make_core, BatchingPolicy(32, 0.0, 4096))
    await runner.start()
    engine = CountingEngine(runner)
    transcriber = Transcriber(engine, None, TranscriberLimits(1200, 180))
    per_block = len(sentences)
    total_utterances = blocks * per_block
    # The test keeps only fixed-size summaries of the work, so its own bookkeeping cannot grow either.
    second_block: list[int] = []
    last_block: deque[int] = deque(maxlen=per_block)
    # (interim decodes, interim samples) per utterance of the second and of the last block.
    second_interims: list[tuple[int, int]] = []
    last_interims: deque[tuple[int, int]] = deque(maxlen=per_block)
    interim_decodes = 0
    decoded_samples = 0  # interims, and finals padded to the model's 0.5 s minimum
    bound_violations: list[UtteranceWork] = []
    seen = 0

    def on_work(w: UtteranceWork) -> None:
        nonlocal seen, interim_decodes, decoded_samples
        if per_block <= w.utterance_index < 2 * per_block:
            second_block.append(w.audio_samples)
            second_interims.append((w.interim_decodes, w.interim_samples))
        last_block.append(w.audio_samples)
        last_interims.append((w.interim_decodes, w.interim_samples))
        interim_decodes += w.interim_decodes
        decoded_samples += w.interim_samples + max(w.audio_samples, 8000)
        # At most one interim per second of audio, each covering at most the utterance, its trailing silence
        # (0.8 s) and one 2 s piece of newer audio.
        if w.interim_decodes > w.audio_samples // 16000 + 1 or w.interim_samples > w.interim_decodes * (
            w.audio_samples + 3 * 16000
        ):
            bound_violations.append(w)
        seen += 1

    session = StreamingSession(
        options(interim_results=True, interim_interval_ms=1000),
        LINEAR16,
        transcriber=transcriber,
        # Silero costs the same per frame at any point of a stream (fixed-size state; test_streaming_vad.py),
        # but 225,000 frames of it take a minute on a 2-core machine: the energy stand-in keeps this test fast.
        vad=VadBatcher(EnergyVad()),
        limits=LIMITS,
        token_decoder=FakeTokenDecoder(),
        on_utterance_work=on_work,
    )
    finals = 0
    last_final: StreamResult | None = None

    async def consume() -> None:
        nonlocal finals, last_final
        async for event in session.events():
            if isinstance(event, StreamResult) and event.is_final:
                finals += 1
                last_final = event

    consumer = asyncio.create_task(consume())
    tracemalloc.start()
    memory: list[int] = []
    held: list[int] = []
    started = time.perf_counter()
    piece = 2 * 16000 * 2  # 2 s pieces, each as soon as the session and the engine are done with the last one
    try:
        for b in range(blocks):
            for offset in range(0, len(block_bytes), piece):
                await session.feed(block_bytes[offset : offset + piece])
                await engine.settle()
            held.append(session.held_samples)
            if b % (blocks // 8) == 0:
                # The fake engine logs every request id for batching tests; that log is not the server's.
                cores[0].batches.clear()
                cores[0].aborted.clear()
                # A full collection also empties CPython's free lists (tuples, floats), which tracemalloc counts as
                # allocated: their warm-up is not a leak.
                gc.collect()
                memory.append(tracemalloc.get_traced_memory()[0])
        await session.finish()
        await consumer
    finally:
        tracemalloc.stop()
        await runner.stop()
    elapsed = time.perf_counter() - started

    assert finals == seen == total_utterances
    assert last_final is not None and last_final.utterance_index == finals - 1
    # Memory: the session never holds more than one utterance of audio, and the heap does not grow from the
    # first quarter hour to the end (a leak of 200 bytes per utterance would add ~330 kB).
    assert max(held) <= 16000 * 30
    growth = [m - memory[1] for m in memory]
    assert max(growth[1:]) < 200_000, growth
    # Work: every decode is at most one utterance long; the same utterance is cut alike at the end as at the
    # start; interims stay within their bounds, and the audio they cover per utterance does not grow: each
    # interim is one engine decode, and the same utterance gets the same interims at the end as at the start.
    assert max_request_s <= 30.5
    assert engine.max_samples <= 30.5 * 16000
    assert second_block == list(last_block)
    assert not bound_violations, bound_violations[:3]
    assert engine.decodes == finals + interim_decodes
    assert engine.samples == decoded_samples
    assert second_interims == list(last_interims)
    assert sum(decodes for decodes, _ in second_interims) >= per_block, second_interims  # interims were asked for
    print(f"2 h stream: {elapsed:.1f} s wall, {finals} finals, heap growth {[g // 1024 for g in growth]} kB")


async def test_cancel_drops_everything_at_once() -> None:
    runner = await fake_transcriber()
    transcriber = Transcriber(runner, None, TranscriberLimits(1200, 180))
    audio, _ = synthesize_sentences(["Hello there, how are you today?"], silence_s=0.5)
    session = StreamingSession(
        options(interim_results=True, interim_interval_ms=200),
        LINEAR16,
        transcriber=transcriber,
        vad=VadBatcher(),
        limits=LIMITS,
    )
    await session.feed(pcm16(audio[: audio.shape[0] // 2]))
    session.cancel()
    events = [e async for e in session.events()]
    assert all(not isinstance(e, StreamResult) or not e.is_final for e in events)
    await asyncio.sleep(0.05)
    assert runner.in_flight == 0
    await runner.stop()
