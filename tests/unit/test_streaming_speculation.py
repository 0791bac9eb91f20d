"""Speculative finals in StreamingSession, over an engine whose final decodes the test answers by hand.

The engine holds every FINAL-priority decode until the test releases it (interims are answered at once), so the
tests see exactly when the session asks for a final's decode: before the endpoint (a speculation), or after it.
Audio is stand-in speech (noise) and digital silence through the energy VAD: probabilities are exactly 1 and 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from asr_server.engine.types import DecodePriority, DecodeRequest, DecodeResult
from asr_server.streaming.endpoint import EndpointSettings
from asr_server.streaming.session import (
    SpeechEvent,
    SpeechEventKind,
    StreamEvent,
    StreamingOptions,
    StreamingSession,
    StreamResult,
    UtteranceWork,
)
from asr_server.transcription import TranscribeOptions, Transcriber, TranscriberLimits
from tests.streaming_helpers import _answer_now, pcm16, pcm16_roundtrip
from tests.unit.test_streaming_interims import LIMITS, LINEAR16, InlineEnergyVad, noise, silence

RATE_HZ = 16_000
PIECE_SAMPLES = RATE_HZ // 10  # 100 ms pieces
TRAILING_MS = 800
SPECULATE_MS = 240


class GatedEngine:
    """Answers interims at once; holds each final-priority decode until `release()`; records what it was asked."""

    model_id = "gated"

    def __init__(self) -> None:
        self.requests: list[DecodeRequest] = []
        self.cancelled: list[DecodeRequest] = []
        self._held: list[asyncio.Future[None]] = []
        self.open = False  # answer everything at once from now on

    @property
    def finals(self) -> list[DecodeRequest]:
        return [r for r in self.requests if r.priority is DecodePriority.FINAL]

    @property
    def held(self) -> int:
        return sum(1 for f in self._held if not f.done())

    async def decode(self, request: DecodeRequest) -> DecodeResult:
        self.requests.append(request)
        if request.priority is DecodePriority.FINAL and not self.open:
            gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._held.append(gate)
            try:
                await gate
            except asyncio.CancelledError:
                self.cancelled.append(request)
                raise
        return _answer_now(request)

    def release(self) -> None:
        for gate in self._held:
            if not gate.done():
                gate.set_result(None)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Lets the loop run (no time passes: every step here is in-loop) until `condition` holds."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


class Stream:
    def __init__(self, speculate_after_ms: int, *, interims: bool = True, max_utterance_ms: int = 30_000) -> None:
        self.engine = GatedEngine()
        self.work: list[UtteranceWork] = []
        self.events: list[StreamEvent] = []
        self.audio = np.zeros(0, dtype=np.float32)
        self.session = StreamingSession(
            StreamingOptions(
                transcribe=TranscribeOptions(language=None, context="", max_new_tokens=4096),
                endpoint=EndpointSettings(
                    trailing_silence_ms=TRAILING_MS,
                    max_utterance_ms=max_utterance_ms,
                    speculate_after_ms=speculate_after_ms,
                ),
                interim_results=interims,
                interim_interval_ms=1000,
            ),
            LINEAR16,
            transcriber=Transcriber(self.engine, None, TranscriberLimits(1200, 180)),
            vad=InlineEnergyVad(),  # type: ignore[arg-type]
            limits=LIMITS,
            on_utterance_work=self.work.append,
        )
        self._consumer = asyncio.get_running_loop().create_task(self._collect())

    async def _collect(self) -> None:
        async for event in self.session.events():
            self.events.append(event)

    @property
    def finals(self) -> list[StreamResult]:
        return [e for e in self.events if isinstance(e, StreamResult) and e.is_final]

    @property
    def ended(self) -> list[SpeechEvent]:
        return [e for e in self.events if isinstance(e, SpeechEvent) and e.kind is SpeechEventKind.ENDED]

    async def feed(self, audio: npt.NDArray[np.float32]) -> None:
        self.audio = np.concatenate([self.audio, pcm16_roundtrip(audio)])
        data = pcm16(audio)
        for offset in range(0, len(data), PIECE_SAMPLES * 2):
            await self.session.feed(data[offset : offset + PIECE_SAMPLES * 2])
            for _ in range(5):  # the decodes this piece started take their first step (and reach the engine)
                await asyncio.sleep(0)

    async def finish(self) -> None:
        self.engine.open = True
        self.engine.release()
        await self.session.finish()
        await self._consumer

    def span_audio(self, start: int, end: int) -> npt.NDArray[np.float32]:
        return self.audio[start:end]


def same_samples(request: DecodeRequest, audio: npt.NDArray[np.float32]) -> bool:
    """The request decodes exactly `audio` (the Transcriber pads pieces shorter than 0.5 s with zeros)."""
    got = request.audio_16k
    n = audio.shape[0]
    return got.shape[0] >= n and np.array_equal(got[:n], audio) and not got[n:].any()


async def test_a_speculation_started_in_the_trailing_silence_is_the_final_when_the_endpoint_fires() -> None:
    stream = Stream(SPECULATE_MS)
    await stream.feed(silence(0.5))
    await stream.feed(noise(1.6, seed=1))
    await stream.feed(silence(0.5))  # past 240 ms of silence, short of the 800 ms endpoint
    (speculative,) = stream.engine.finals
    assert not stream.ended and not stream.finals
    stream.engine.release()  # the speculation's decode is done before the endpoint fires
    await stream.feed(silence(0.6))
    # The endpoint fired; the final comes out with nothing more decoded: it is the speculation's result.
    (ended,) = stream.ended
    await until(lambda: len(stream.finals) == 1, "the final")
    assert stream.engine.finals == [speculative] and stream.engine.held == 0
    # No interim was decoded while the speculation was held (one was due at 2.5 s of audio: 1 s after the one at
    # 1.5 s), and some were before it.
    after = stream.engine.requests[stream.engine.requests.index(speculative) + 1 :]
    assert not [r for r in after if r.priority is DecodePriority.INTERIM]
    assert any(r.priority is DecodePriority.INTERIM for r in stream.engine.requests)
    (final,) = stream.finals
    assert final.end_ms == ended.offset_ms
    start, end = final.start_ms * 16, final.end_ms * 16
    assert same_samples(speculative, stream.span_audio(start, end))
    assert final.text == _answer_now(speculative).text and final.text
    await stream.finish()
    (work,) = stream.work
    assert (work.speculations, work.speculations_kept, work.speculations_discarded) == (1, 1, 0)


async def test_the_final_waits_on_a_speculation_still_decoding_and_does_not_decode_again() -> None:
    stream = Stream(SPECULATE_MS, interims=False)
    await stream.feed(np.concatenate([silence(0.5), noise(1.2, seed=2), silence(1.5)]))
    assert len(stream.ended) == 1 and not stream.finals
    (speculative,) = stream.engine.finals  # asked for before the endpoint, still held by the engine
    stream.engine.release()
    await until(lambda: len(stream.finals) == 1, "the final")
    assert stream.engine.finals == [speculative] and not stream.engine.cancelled
    await stream.finish()
    assert [(w.speculations, w.speculations_kept) for w in stream.work] == [(1, 1)]


async def test_speech_resuming_cancels_the_speculation_and_the_final_covers_the_whole_utterance() -> None:
    stream = Stream(SPECULATE_MS)
    await stream.feed(np.concatenate([silence(0.5), noise(1.2, seed=3), silence(0.5)]))  # a 500 ms pause
    (first,) = stream.engine.finals
    await stream.feed(noise(1.0, seed=4))  # speech resumes: the speculation is dropped in the engine at once
    assert stream.engine.cancelled == [first] and stream.engine.held == 0
    assert not stream.ended
    await stream.feed(silence(0.5))
    second = stream.engine.finals[1]
    assert len(stream.engine.finals) == 2
    # The engine freed the utterance's cached windows with the cancelled FINAL decode: the rest of the utterance
    # goes under a new stream key.
    assert second.stream_key != first.stream_key
    await stream.feed(silence(0.6))
    assert len(stream.ended) == 1
    stream.engine.release()
    await until(lambda: len(stream.finals) == 1, "the final")
    assert len(stream.engine.finals) == 2
    (final,) = stream.finals
    # One utterance from the first speech to the end of the second, decoded from its exact samples.
    assert final.start_ms < 1000 and final.end_ms > 2600
    assert same_samples(second, stream.span_audio(final.start_ms * 16, final.end_ms * 16))
    assert final.text == _answer_now(second).text
    await stream.finish()
    (work,) = stream.work
    assert (work.speculations, work.speculations_kept, work.speculations_discarded) == (2, 1, 1)


async def test_a_max_length_cut_in_the_silence_discards_the_speculation() -> None:
    stream = Stream(SPECULATE_MS, interims=False, max_utterance_ms=2_000)
    await stream.feed(np.concatenate([silence(0.5), noise(1.4, seed=5), silence(0.4)]))
    (speculative,) = stream.engine.finals
    assert not stream.ended
    await stream.feed(silence(0.3))  # the utterance reaches 2 s in its silence: cut there (forced), not ended
    assert stream.engine.cancelled == [speculative]
    assert len(stream.ended) == 1
    await stream.finish()
    first = stream.finals[0]
    span = stream.span_audio(first.start_ms * 16, first.end_ms * 16)
    # The cut utterance's final is decoded on its own, of its exact span, once.
    (own,) = [r for r in stream.engine.finals if same_samples(r, span)]
    assert own is not speculative
    work = stream.work[0]
    assert (work.speculations, work.speculations_kept, work.speculations_discarded) == (1, 0, 1)


async def test_with_speculation_off_the_final_is_decoded_after_the_endpoint_as_before() -> None:
    stream = Stream(0)
    await stream.feed(np.concatenate([silence(0.5), noise(1.6, seed=1), silence(0.5)]))
    assert not stream.engine.finals  # nothing ahead of the endpoint
    await stream.feed(silence(0.6))
    assert len(stream.ended) == 1
    (final_decode,) = stream.engine.finals  # asked for only once the endpoint fired, and the final waits for it
    assert not stream.finals
    stream.engine.release()
    await until(lambda: len(stream.finals) == 1, "the final")
    await stream.finish()
    (work,) = stream.work
    assert (work.speculations, work.speculations_kept, work.speculations_discarded) == (0, 0, 0)


@pytest.mark.parametrize("interims", [False, True])
async def test_finals_and_speech_events_are_the_same_with_speculation_on_and_off(interims: bool) -> None:
    # Pauses of every kind: shorter than the speculation delay, between it and the endpoint, and endpoints.
    parts = [silence(0.5)]
    for i, pause_s in enumerate([0.1, 0.5, 1.2, 0.3, 0.6, 2.0]):
        parts += [noise(0.4 + 0.3 * i, seed=10 + i), silence(pause_s)]
    audio = np.concatenate(parts)
    results = []
    for speculate_ms in (0, SPECULATE_MS):
        stream = Stream(speculate_ms, interims=interims)
        stream.engine.release()
        data_pieces = [audio[i : i + PIECE_SAMPLES] for i in range(0, audio.shape[0], PIECE_SAMPLES)]
        for piece in data_pieces:
            await stream.feed(piece)
            stream.engine.release()
        await stream.finish()
        finals = [(f.utterance_index, f.text, f.start_ms, f.end_ms) for f in stream.finals]
        speech = [(e.kind, e.offset_ms) for e in stream.events if isinstance(e, SpeechEvent)]
        results.append((finals, speech, stream.work))
    (off_finals, off_speech, off_work), (on_finals, on_speech, on_work) = results
    assert on_finals == off_finals and on_speech == off_speech
    assert len(on_finals) == 2  # closed by the 1.2 s and the 2 s pauses
    assert sum(w.speculations_discarded for w in on_work) >= 2  # the 0.5 s and 0.6 s pauses (0.3 s: maybe)
    assert [w.speculations_kept for w in on_work] == [1, 1]
    assert all(w.speculations == 0 for w in off_work)
