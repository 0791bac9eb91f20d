"""A live stream through the real gRPC server on the continuous engine with torch features: the session names
each utterance to the engine (DecodeRequest.stream_key, the same on its interims and its final), the engine
reuses the utterance's completed encoder windows, the final still equals Transcribe on the utterance's audio,
and nothing stays cached once the stream is over."""

from __future__ import annotations

import pytest

from asr_server.engine.continuous.core import ContinuousEngine
from asr_server.engine.types import DecodePriority, DecodeRequest, DecodeResult
from asr_server.models.tiny_checkpoint import TinyCheckpoints
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import running_server
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import LINEAR16_16K, pcm16, run_stream, stream_config, tiny_stream_cache_config

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

MAX_NEW_TOKENS = 8
# One utterance longer than an encoder window (8 s), with no pause the endpointer would close it at.
LONG_SENTENCE = (
    "The quick brown fox jumps over the lazy dog while seven wizards quietly box the jumping frogs "
    "and the old grey cat watches them from the warm windowsill near the kitchen door all afternoon"
)


async def test_a_stream_reuses_its_utterance_windows_and_its_final_equals_transcribe(
    tiny_checkpoints: TinyCheckpoints,
) -> None:
    audio, spans = synthesize_sentences([LONG_SENTENCE], silence_s=1.0)
    assert spans[0][1] - spans[0][0] > 10.0, spans
    data = pcm16(audio)
    config = tiny_stream_cache_config(str(tiny_checkpoints.asr_hf))
    async with running_server(config) as (server, channel):
        core = server.engine.core  # type: ignore[union-attr]
        assert isinstance(core, ContinuousEngine)
        decoded: list[DecodeRequest] = []
        real_decode = server.engine.decode

        async def recording_decode(request: DecodeRequest) -> DecodeResult:
            decoded.append(request)
            return await real_decode(request)

        server.engine.decode = recording_decode  # type: ignore[method-assign]
        stub = pb_grpc.AsrServiceStub(channel)
        received = await run_stream(
            stub,
            stream_config(interim=True, interval_ms=1000, max_new_tokens=MAX_NEW_TOKENS),
            data,
            piece_ms=20,
            realtime=4.0,
        )
        (final,) = received.finals
        unary = await stub.Transcribe(
            pb.TranscribeRequest(
                config=pb.RecognitionConfig(audio_format=LINEAR16_16K, max_new_tokens=MAX_NEW_TOKENS),
                audio=data[final.start_ms * 32 : final.end_ms * 32],
            )
        )
        streamed = [r for r in decoded if r.stream_key is not None]
        assert final.text == unary.transcripts[0].text
        # The interims and the final of the one utterance share one key; Transcribe has none.
        assert len({r.stream_key for r in streamed}) == 1
        assert [r.priority for r in streamed].count(DecodePriority.FINAL) == 1
        assert sum(1 for r in decoded if r.stream_key is None) == 1
        # Windows were reused (interims past 8 s of the utterance, and the final), and the final freed them.
        assert core.stream_cache.hits > 0
        assert len(core.stream_cache) == 0 and core.stream_cache.nbytes == 0
