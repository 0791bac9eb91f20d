"""StreamingRecognize with the tiny checkpoint (random weights, real model code) through the real gRPC server, on
both engines: `transformers` (padded generate) and `continuous` (the default; its FastPreparer builds prompts from
a cached template and appends an interim's continuation prefix as token ids).

Parity: a final's text is what Transcribe gives for that utterance's audio. Streams here are LINEAR16 at
16 kHz, so the utterance's samples are exactly the int16 bytes of [start_ms, end_ms) (no resampling happens;
with resampling, incremental and one-shot soxr agree only on the whole signal, not on a slice of it, and parity
is defined on the 16 kHz samples the server used).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import pytest

from asr_server.config import Config, ContinuousConfig, ModelConfig
from asr_server.engine.continuous.core import ContinuousEngine
from asr_server.engine.core import EngineCore
from asr_server.engine.generate_core import GenerateEngine
from asr_server.engine.types import DecodePriority, DecodeRequest, DecodeResult, WorkItem
from asr_server.models.loading import LoadedAsrModel, load_asr_model
from asr_server.models.tiny_checkpoint import TinyCheckpoints
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import pcm16, run_stream, stream_config, transcribe_spans

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

MAX_NEW_TOKENS = 16
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Please call Stella and ask her to bring these things."]


@pytest.fixture(scope="module")
def tiny_asr(tiny_checkpoints: TinyCheckpoints) -> LoadedAsrModel:
    return load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cpu")


def _engine_setup(
    engine: str, tiny_asr: LoadedAsrModel, tiny_checkpoints: TinyCheckpoints
) -> tuple[Config, Callable[[], EngineCore] | None, type[EngineCore]]:
    """(config, core factory, the core type that must run) for one engine on CPU, fp32.

    The model directory is configured for both: the servicer reads the tokenizer from it for interim prefixes.
    `transformers` gets a GenerateEngine over the module's loaded model; `continuous` is built by the server itself
    from the config (engine/factory.py), as `asr-server serve` builds it.
    """
    model = ModelConfig(model=str(tiny_checkpoints.asr_hf), device="cpu", dtype="float32")
    if engine == "transformers":
        config = dataclasses.replace(fake_config(kind="transformers", max_batch_wait_ms=2), model=model)
        return config, lambda: GenerateEngine(tiny_asr, max_batch_size=8), GenerateEngine
    engine_config = fake_config(
        kind="continuous", max_batch_wait_ms=0, continuous=ContinuousConfig(max_running=8, kv_cache_tokens=8192)
    )
    return dataclasses.replace(engine_config, model=model), None, ContinuousEngine


@pytest.mark.parametrize("engine", ["transformers", "continuous"])
async def test_finals_equal_unary_results_and_interims_arrive_before_the_utterance_ends(
    engine: str,
    tiny_asr: LoadedAsrModel,
    tiny_checkpoints: TinyCheckpoints,
    caplog: pytest.LogCaptureFixture,
) -> None:
    audio, spans = synthesize_sentences(SENTENCES, silence_s=1.0)
    data = pcm16(audio)
    config, core_factory, core_type = _engine_setup(engine, tiny_asr, tiny_checkpoints)
    caplog.set_level(logging.WARNING, logger="asr_server")
    async with running_server(config, core_factory=core_factory) as (server, channel):
        assert isinstance(server.engine.core, core_type)  # type: ignore[union-attr]
        # Record what reaches the engine, to check the interims that carried a continuation prefix.
        decoded: list[tuple[DecodeRequest, DecodeResult]] = []
        real_decode = server.engine.decode

        async def recording_decode(request: DecodeRequest) -> DecodeResult:
            result = await real_decode(request)
            decoded.append((request, result))
            return result

        server.engine.decode = recording_decode  # type: ignore[method-assign]
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
        unary = await transcribe_spans(stub, data, finals, MAX_NEW_TOKENS)
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
    # Interims after an utterance's first two carry the previous interim's output as a prefix: each such decode
    # equals `model.generate` run alone on the reference prompt (apply_transcription_request + the prefix's ids).
    prefixed = [(request, result) for request, result in decoded if request.prefix_text]
    assert prefixed, [request.prefix_text for request, _ in decoded]
    reference = GenerateEngine(tiny_asr, max_batch_size=1)
    for request, result in prefixed:
        (expected,) = reference._run_batch([WorkItem(request, time.time_ns(), time.monotonic())])
        assert expected.result is not None
        assert (result.token_ids, result.text) == (expected.result.token_ids, expected.result.text), request.prefix_text
    # Finals carry their utterance's last interim's tokens as a draft (the continuous engine verifies it in the
    # prefill, the transformers engine ignores it): the tokens are `model.generate`'s for the request without it.
    drafted = [(r, res) for r, res in decoded if r.priority is DecodePriority.FINAL and r.draft_token_ids]
    assert len(drafted) >= len(SENTENCES), [r.priority for r, _ in decoded]
    for request, result in drafted:
        plain = dataclasses.replace(request, draft_token_ids=())
        (expected,) = reference._run_batch([WorkItem(plain, time.time_ns(), time.monotonic())])
        assert expected.result is not None and result.token_ids == expected.result.token_ids
    # None failed: the session logs a failed interim and carries on, so only the log shows it.
    failed = [r.getMessage() for r in caplog.records if "interim decode failed" in r.getMessage()]
    assert not failed, failed
