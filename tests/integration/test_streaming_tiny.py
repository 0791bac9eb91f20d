"""StreamingRecognize with the tiny checkpoint (random weights, real model code) through the real gRPC server.

Parity: a final's text is what Transcribe gives for that utterance's audio. Streams here are LINEAR16 at
16 kHz, so the utterance's samples are exactly the int16 bytes of [start_ms, end_ms) (no resampling happens;
with resampling, incremental and one-shot soxr agree only on the whole signal, not on a slice of it, and parity
is defined on the 16 kHz samples the server used).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from asr_server.config import ModelConfig
from asr_server.engine.generate_core import GenerateEngine
from asr_server.models.loading import LoadedAsrModel, load_asr_model
from asr_server.models.tiny_checkpoint import TinyCheckpoints
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import LINEAR16_16K, pcm16, run_stream, stream_config

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

MAX_NEW_TOKENS = 16
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Please call Stella and ask her to bring these things."]


@pytest.fixture(scope="module")
def tiny_asr(tiny_checkpoints: TinyCheckpoints) -> LoadedAsrModel:
    return load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cpu")


async def test_finals_equal_unary_results_and_interims_arrive_before_the_utterance_ends(
    tiny_asr: LoadedAsrModel, tiny_checkpoints: TinyCheckpoints
) -> None:
    audio, spans = synthesize_sentences(SENTENCES, silence_s=1.0)
    data = pcm16(audio)
    # The model directory is configured too: the servicer reads the tokenizer from it for interim prefixes.
    config = dataclasses.replace(
        fake_config(kind="transformers", max_batch_wait_ms=2),
        model=ModelConfig(model=str(tiny_checkpoints.asr_hf)),
    )
    async with running_server(config, core_factory=lambda: GenerateEngine(tiny_asr, max_batch_size=8)) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        received = await run_stream(
            stub,
            stream_config(interim=True, interval_ms=500, max_new_tokens=MAX_NEW_TOKENS),
            data,
            piece_ms=20,
            realtime=1.0,
        )
        finals = received.finals
        assert len(finals) == len(SENTENCES)
        unary = [
            await stub.Transcribe(
                pb.TranscribeRequest(
                    config=pb.RecognitionConfig(audio_format=LINEAR16_16K, max_new_tokens=MAX_NEW_TOKENS),
                    audio=data[f.start_ms * 32 : f.end_ms * 32],
                )
            )
            for f in finals
        ]
    for final, response, (start_s, end_s) in zip(finals, unary, spans, strict=True):
        assert final.text == response.transcripts[0].text
        assert final.language == response.transcripts[0].language
        assert abs(final.start_ms - start_s * 1000) <= 100 and abs(final.end_ms - end_s * 1000) <= 100
    # Interims: each utterance got some while it was still being spoken (streamed at real-time pace).
    for final in finals:
        interims = [(t, r) for t, r in received.interims if r.utterance_index == final.utterance_index]
        assert interims, f"no interim for utterance {final.utterance_index}"
        first_at = interims[0][0]
        audio_end_sent_at = next(t for t, position_ms in received.sent if position_ms >= final.end_ms)
        assert first_at < audio_end_sent_at, (first_at, audio_end_sent_at)
        assert all(0.0 <= r.stability <= 0.9 for _, r in interims)
        assert np.all(np.diff([r.end_ms for _, r in interims]) > 0)
