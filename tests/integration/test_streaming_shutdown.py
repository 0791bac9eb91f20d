"""Live streams at the server's edges: shutdown flushes open utterances (never INTERNAL), capacity refuses new
streams with retry advice (fake engine, Silero VAD, espeak-ng speech).

Why INTERNAL was seen: not the server. It sent UNAVAILABLE to every stream it drained; grpc.aio's client replaced that
status with INTERNAL "Internal error from Core" on the streams where one of its own writes (the caller still sending
audio) failed as the call ended (grpc/grpc#36066). `ServerStatus` reads the status the server sent."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status

from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import ServerStatus, pcm16, stream_config

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

PIECE_BYTES = 640  # 20 ms of 16 kHz LINEAR16


async def _speak_then_hold(data: bytes, stop: asyncio.Event) -> AsyncIterator[pb.StreamingRecognizeRequest]:
    """The config, the speech at twice real time, then silence until `stop`: a call that never hangs up."""
    yield stream_config(interim=True)
    for offset in range(0, len(data), PIECE_BYTES):
        yield pb.StreamingRecognizeRequest(audio=data[offset : offset + PIECE_BYTES])
        await asyncio.sleep(0.01)
    silence = bytes(PIECE_BYTES)
    while not stop.is_set():
        yield pb.StreamingRecognizeRequest(audio=silence)
        await asyncio.sleep(0.02)


@dataclass
class _Outcome:
    responses: list[pb.StreamingRecognizeResponse]
    reported: grpc.StatusCode  # what grpc.aio reports
    reported_details: str
    server: ServerStatus  # what the server sent

    @property
    def finals(self) -> list[pb.StreamingResult]:
        return [r.result for r in self.responses if r.HasField("result") and r.result.is_final]


async def _collect(call: grpc.aio.StreamStreamCall) -> _Outcome:
    server = ServerStatus(call)
    responses = []
    try:
        async for response in call:
            responses.append(response)
    except grpc.aio.AioRpcError as error:
        return _Outcome(responses, error.code(), error.details() or "", server)
    return _Outcome(responses, grpc.StatusCode.OK, "", server)


async def test_shutdown_flushes_every_open_utterance_and_ends_every_stream_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    audio, spans = synthesize_sentences(["Please call Stella and ask her to bring these things."], silence_s=0.3)
    cut = int((spans[0][0] + 1.2) * 16000)  # each stream is mid-sentence when the server stops
    data = pcm16(audio[:cut])
    streams = 50
    async with running_server(fake_config(max_inference_batch_size=64)) as (server, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        stop = asyncio.Event()
        calls = [stub.StreamingRecognize(_speak_then_hold(data, stop)) for _ in range(streams)]
        tasks = [asyncio.create_task(_collect(call)) for call in calls]
        sessions = server._servicer._sessions  # type: ignore[union-attr]
        # Wait until every stream's audio up to the cut has been through VAD (its utterance is open)...
        async with asyncio.timeout(60):
            while len(sessions) < streams or any(s.processed_ms * 16 < cut - 16000 for s in sessions):
                await asyncio.sleep(0.05)
        # ...then stop, the clients still sending (silence), as on a SIGTERM in the middle of live calls.
        with caplog.at_level(logging.INFO, logger="asr_server.edge.servicer"):
            await server.stop(grace_s=10.0)
        stop.set()
        outcomes = await asyncio.gather(*tasks)
    assert f"shutdown: {streams} open utterances of {streams} live streams flushed" in caplog.text
    # Every stream: its open utterance came back as a final (its audio up to where the server stopped reading),
    # then the server ended it UNAVAILABLE, never INTERNAL.
    for outcome in outcomes:
        assert outcome.server.code is grpc.StatusCode.UNAVAILABLE, (outcome.server.code, outcome.server.details)
        assert "shutting down" in outcome.server.details
        assert len(outcome.finals) == 1 and outcome.finals[0].text
        assert abs(outcome.finals[0].start_ms - spans[0][0] * 1000) <= 150
    # What grpc.aio reports is the server's UNAVAILABLE, or its own INTERNAL of grpc/grpc#36066 (see ServerStatus).
    lost = [o for o in outcomes if o.reported is not grpc.StatusCode.UNAVAILABLE]
    assert all(o.reported is grpc.StatusCode.INTERNAL for o in lost)
    assert all(o.reported_details == "Internal error from Core" for o in lost)
    print(f"{len(lost)} of {streams} streams reported INTERNAL by grpc.aio over the server's UNAVAILABLE")


async def test_a_stream_opened_once_the_drain_began_is_refused_unavailable() -> None:
    async with running_server(fake_config()) as (server, channel):
        assert await server._servicer.drain_streams() == 0  # type: ignore[union-attr]
        done = asyncio.Event()
        done.set()
        outcome = await _collect(pb_grpc.AsrServiceStub(channel).StreamingRecognize(_speak_then_hold(b"", done)))
        assert outcome.server.code is grpc.StatusCode.UNAVAILABLE and "shutting down" in outcome.server.details
        assert outcome.responses == []


async def test_past_the_capacity_new_streams_are_refused_with_retry_advice() -> None:
    config = fake_config()
    config = dataclasses.replace(config, streaming=dataclasses.replace(config.streaming, max_live_streams_per_replica=3))
    silence = pcm16(np.zeros(16000, dtype=np.float32))
    async with running_server(config) as (server, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        stop = asyncio.Event()
        held = [stub.StreamingRecognize(_speak_then_hold(silence, stop)) for _ in range(3)]
        tasks = [asyncio.create_task(_collect(call)) for call in held]
        async with asyncio.timeout(10):
            while len(server._servicer._sessions) < 3:  # type: ignore[union-attr]
                await asyncio.sleep(0.02)
        extra = stub.StreamingRecognize(_speak_then_hold(silence, stop))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await extra.read()
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
        assert status is not None and "capacity of 3 live streams" in status.message
        assert any(d.type_url.endswith("google.rpc.RetryInfo") for d in status.details)
        stop.set()
        await asyncio.gather(*tasks)
        # Capacity comes back when streams end.
        async with asyncio.timeout(10):
            while server._servicer._sessions:  # type: ignore[union-attr]
                await asyncio.sleep(0.02)
        done = asyncio.Event()
        done.set()  # one second of silence, then a half-close
        again = stub.StreamingRecognize(_speak_then_hold(silence, done))
        assert (await _collect(again)).reported is grpc.StatusCode.OK
