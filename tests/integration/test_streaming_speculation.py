"""Speculative finals through the real gRPC server (Silero VAD, espeak-ng speech, the fake engine taking 600 ms
per batch): the final's decode starts in the trailing silence, so the final comes soon after SPEECH_ENDED
instead of one decode later, and it is the same final as with speculation off."""

from __future__ import annotations

import dataclasses

import pytest

from asr_server.config import Config
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import Received, pcm16, run_stream, stream_config

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

DECODE_MS = 600.0


def _config(speculate_ms: int) -> Config:
    config = fake_config(fake_batch_delay_ms=DECODE_MS, max_batch_wait_ms=0)
    streaming = dataclasses.replace(config.streaming, speculative_final_after_ms=speculate_ms)
    return dataclasses.replace(config, streaming=streaming)


def _decode_after_endpoint_s(received: Received) -> float:
    """When the final arrived, less when its SPEECH_ENDED did (client clock)."""
    ended = next(
        t
        for t, r in received.responses
        if r.HasField("speech_event") and r.speech_event.type == pb.SPEECH_EVENT_TYPE_SPEECH_ENDED
    )
    final = next(t for t, r in received.responses if r.HasField("result") and r.result.is_final)
    return final - ended


async def test_the_final_arrives_sooner_after_the_endpoint_and_is_the_same_final() -> None:
    audio, _ = synthesize_sentences(["The quick brown fox jumps over the lazy dog."], silence_s=1.2)
    data = pcm16(audio)
    received: dict[int, Received] = {}
    kept: dict[int, float | None] = {}
    for speculate_ms in (0, 240):
        async with running_server(_config(speculate_ms)) as (server, channel):
            stub = pb_grpc.AsrServiceStub(channel)
            # Real time: the 560 ms between the speculation and the endpoint pass as they would on a live call.
            received[speculate_ms] = await run_stream(stub, stream_config(), data, piece_ms=20, realtime=1.0)
            kept[speculate_ms] = server.metrics.registry.get_sample_value(
                "asr_stream_speculative_finals_total", {"outcome": "kept"}
            )
    off, on = received[0], received[240]
    assert [(f.text, f.start_ms, f.end_ms) for f in on.finals] == [(f.text, f.start_ms, f.end_ms) for f in off.finals]
    assert len(on.finals) == 1 and on.finals[0].text
    assert kept == {0: None, 240: 1.0}  # the metric counts the speculation the final used
    off_s, on_s = _decode_after_endpoint_s(off), _decode_after_endpoint_s(on)
    # Off: one whole decode after the endpoint. On: what is left of the decode that started 560 ms earlier.
    assert off_s >= DECODE_MS / 1000 * 0.9, off_s
    assert on_s < off_s / 2, (on_s, off_s)
