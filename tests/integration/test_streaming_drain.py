"""Shutdown of a live stream (StreamingSession.drain): the open utterance comes back as a final, then the stream
ends with Unavailable, so a caller cut by a SIGTERM loses no speech and knows to reconnect."""

from __future__ import annotations

import pytest

from asr_server.audio.formats import AudioFormat, AudioLimits, Encoding
from asr_server.engine.fake import FakeEngine
from asr_server.engine.runner import BatchingPolicy, EngineRunner
from asr_server.errors import Unavailable
from asr_server.streaming.endpoint import EndpointSettings
from asr_server.streaming.session import StreamingOptions, StreamingSession, StreamResult
from asr_server.streaming.vad import VadBatcher
from asr_server.transcription import TranscribeOptions, Transcriber, TranscriberLimits
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import pcm16

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

LIMITS = AudioLimits(max_audio_duration_s=3600, max_message_bytes=64 << 20, max_stream_bytes=1 << 31)


async def test_drain_flushes_the_open_utterance_then_ends_unavailable() -> None:
    runner = EngineRunner(lambda: FakeEngine(max_batch_size=8), BatchingPolicy(8, 0.0, 64))
    await runner.start()
    try:
        transcriber = Transcriber(runner, None, TranscriberLimits(1200, 180))
        audio, spans = synthesize_sentences(["Hello there, how are you today?", "The quick brown fox."], silence_s=1.0)
        session = StreamingSession(
            StreamingOptions(TranscribeOptions(None, "", 4096), EndpointSettings()),
            AudioFormat(Encoding.LINEAR16, 16000, 1),
            transcriber=transcriber,
            vad=VadBatcher(),
            limits=LIMITS,
        )
        cut = int((spans[1][0] + 0.5) * 16000)  # inside the second sentence
        data = pcm16(audio[:cut])
        for offset in range(0, len(data), 640):
            await session.feed(data[offset : offset + 640])
        events = []
        flushed = await session.drain("the server is shutting down; reconnect to continue")
        with pytest.raises(Unavailable, match="shutting down"):
            async for event in session.events():
                events.append(event)
        finals = [e for e in events if isinstance(e, StreamResult) and e.is_final]
        assert flushed == 1
        assert [f.utterance_index for f in finals] == [0, 1]
        assert finals[1].end_ms == cut // 16
        assert not session.accepting_audio
        assert await session.drain("again") == 0
    finally:
        await runner.stop()


async def test_a_final_later_than_the_lag_limit_is_reported() -> None:
    # The engine takes 300 ms a batch: each final comes >= 300 ms after its utterance closed.
    runner = EngineRunner(lambda: FakeEngine(max_batch_size=8, batch_delay_ms=300), BatchingPolicy(8, 0.0, 64))
    await runner.start()
    try:
        transcriber = Transcriber(runner, None, TranscriberLimits(1200, 180))
        audio, _ = synthesize_sentences(["Hello there, how are you today?"], silence_s=1.0)
        reported: dict[int, list[float]] = {}
        for limit_ms in (100, 5000):
            lags = reported.setdefault(limit_ms, [])
            session = StreamingSession(
                StreamingOptions(TranscribeOptions(None, "", 4096), EndpointSettings()),
                AudioFormat(Encoding.LINEAR16, 16000, 1),
                transcriber=transcriber,
                vad=VadBatcher(),
                limits=LIMITS,
                max_lag_ms=limit_ms,
                on_lag=lags.append,
            )
            await session.feed(pcm16(audio))
            await session.finish()
            finals = [e async for e in session.events() if isinstance(e, StreamResult) and e.is_final]
            assert len(finals) == 1 and session.max_final_delay_ms >= 300
        assert len(reported[100]) == 1 and reported[100][0] >= 300
        assert reported[5000] == []
    finally:
        await runner.stop()
