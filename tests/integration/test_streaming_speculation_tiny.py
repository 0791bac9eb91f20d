"""Speculative finals on the tiny checkpoint (random weights, real model code, the continuous engine): a final
the session decoded ahead of the endpoint, kept or after a discarded one, equals Transcribe on the utterance's
audio, and the utterance's final audio is decoded once.

The session runs in-process over the server's engine (so its UtteranceWork counts can be read), with the energy
VAD on espeak-ng speech and digital silence; every piece's decodes are answered before the next piece is fed
(CountingEngine.settle), so what is decoded depends on the audio alone. Transcribe goes through gRPC.
"""

from __future__ import annotations

import asyncio

import numpy as np
import numpy.typing as npt
import pytest

from asr_server.engine.continuous.core import ContinuousEngine
from asr_server.engine.types import DecodePriority, DecodeRequest, DecodeResult
from asr_server.models.tiny_checkpoint import TinyCheckpoints
from asr_server.streaming.endpoint import EndpointSettings
from asr_server.streaming.session import StreamingOptions, StreamingSession, StreamResult, UtteranceWork
from asr_server.transcription import DecodeBackend, TranscribeOptions, Transcriber, TranscriberLimits
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import running_server
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import CountingEngine, pcm16, tiny_stream_cache_config, transcribe_spans
from tests.unit.test_streaming_interims import LIMITS, LINEAR16, InlineEnergyVad

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

MAX_NEW_TOKENS = 12
PIECE_BYTES = 2 * 1600  # 100 ms


class Recording:
    """Passes decodes on, keeping each request (to see which audio was decoded, and how often)."""

    model_id = "recording"

    def __init__(self, inner: DecodeBackend) -> None:
        self._inner = inner
        self.requests: list[DecodeRequest] = []

    async def decode(self, request: DecodeRequest) -> DecodeResult:
        self.requests.append(request)
        return await self._inner.decode(request)


async def stream_in_process(
    backend: DecodeBackend, audio: npt.NDArray[np.float32], speculate_after_ms: int
) -> tuple[list[StreamResult], list[UtteranceWork], list[DecodeRequest]]:
    recording = Recording(backend)
    engine = CountingEngine(recording)
    work: list[UtteranceWork] = []
    session = StreamingSession(
        StreamingOptions(
            transcribe=TranscribeOptions(language=None, context="", max_new_tokens=MAX_NEW_TOKENS),
            endpoint=EndpointSettings(trailing_silence_ms=800, speculate_after_ms=speculate_after_ms),
            interim_results=True,
            interim_interval_ms=1000,
        ),
        LINEAR16,
        transcriber=Transcriber(engine, None, TranscriberLimits(1200, 180)),
        vad=InlineEnergyVad(),  # type: ignore[arg-type]
        limits=LIMITS,
        on_utterance_work=work.append,
    )
    finals: list[StreamResult] = []

    async def collect() -> None:
        async for event in session.events():
            if isinstance(event, StreamResult) and event.is_final:
                finals.append(event)

    consumer = asyncio.get_running_loop().create_task(collect())
    data = pcm16(audio)
    for offset in range(0, len(data), PIECE_BYTES):
        await session.feed(data[offset : offset + PIECE_BYTES])
        await engine.settle()
    await session.finish()
    await consumer
    return finals, work, recording.requests


def decodes_of(requests: list[DecodeRequest], data: bytes, final: StreamResult) -> int:
    """How many decodes had exactly the final's samples (padded to 0.5 s at most)."""
    samples = (np.frombuffer(data[final.start_ms * 32 : final.end_ms * 32], "<i2") / 32768.0).astype(np.float32)
    n = samples.shape[0]
    return sum(
        1
        for r in requests
        if r.audio_16k.shape[0] >= n and np.array_equal(r.audio_16k[:n], samples) and not r.audio_16k[n:].any()
    )


@pytest.mark.parametrize("case", ["kept", "discarded"])
async def test_speculative_finals_equal_transcribe_and_decode_the_final_audio_once(
    case: str, tiny_checkpoints: TinyCheckpoints
) -> None:
    if case == "kept":
        audio, spans = synthesize_sentences(["The quick brown fox jumps over the lazy dog."], silence_s=1.0)
    else:
        # Two sentences 500 ms apart: past the 240 ms speculation, short of the 800 ms endpoint: one utterance.
        audio, spans = synthesize_sentences(["Please call Stella.", "Ask her to bring these things."], 0.5)
        audio = np.concatenate([audio, np.zeros(16_000, dtype=np.float32)])
    data = pcm16(audio)
    config = tiny_stream_cache_config(str(tiny_checkpoints.asr_hf))
    async with running_server(config) as (server, channel):
        core = server.engine.core  # type: ignore[union-attr]
        assert isinstance(core, ContinuousEngine)
        finals, work, requests = await stream_in_process(server.engine, audio, speculate_after_ms=240)
        stub = pb_grpc.AsrServiceStub(channel)
        unary = await transcribe_spans(stub, data, finals, MAX_NEW_TOKENS)
        # Nothing stays cached under any of the utterance's keys (renamed after a discarded speculation).
        assert len(core.stream_cache) == 0 and core.stream_cache.nbytes == 0
    (final,) = finals
    assert final.text == unary[0].transcripts[0].text
    assert final.language == unary[0].transcripts[0].language
    # The utterance spans all of its speech.
    assert final.start_ms <= spans[0][0] * 1000 + 50 and final.end_ms >= spans[-1][1] * 1000 - 50
    (w,) = work
    assert w.speculations_kept == 1
    assert w.speculations == w.speculations_kept + w.speculations_discarded
    if case == "discarded":
        assert w.speculations_discarded >= 1
    # The final's own audio went to the engine once: the speculation it kept; no decode after the endpoint.
    assert decodes_of(requests, data, final) == 1
    assert sum(1 for r in requests if r.priority is DecodePriority.FINAL) == w.speculations
