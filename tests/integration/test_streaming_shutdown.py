"""Live streams at the server's edges: shutdown flushes open utterances (never INTERNAL), capacity refuses new
streams with retry advice (fake engine, Silero VAD, espeak-ng speech).

Why INTERNAL was seen: not the server. It sent UNAVAILABLE to every stream it drained; grpc.aio's client replaced that
status with INTERNAL "Internal error from Core" on the streams where one of its own writes (the caller still sending
audio) failed as the call ended (grpc/grpc#36066). `ServerStatus` reads the status the server sent."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.clients.servers import running_server_process
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


async def _until_port_closes(address: str, timeout_s: float) -> bool:
    host, port = address.rsplit(":", 1)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            return True
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.02)
    return False


async def _poll_health(address: str, answers: list[tuple[float, str]], stop: asyncio.Event) -> None:
    """Check "" every 20 ms on a channel of its own, recording each answer (a status name, or the error code)."""
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                answers.append((loop.time(), health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)))
            except grpc.aio.AioRpcError as error:
                answers.append((loop.time(), f"error {error.code().name}: {error.details()}"))
                return
            await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_sigterm_with_100_live_streams_on_a_server_process() -> None:
    """The issue's drain proof on a real `asr-server serve --engine fake`: SIGTERM with 100 live streams mid-sentence.
    Every stream gets its open utterance as a final and the server ends it UNAVAILABLE (zero INTERNAL sent), the
    server logs no traceback, and health Check answers NOT_SERVING from the SIGTERM until the port closes."""
    audio, spans = synthesize_sentences(["Please call Stella and ask her to bring these things."], silence_s=0.3)
    data = pcm16(audio[: int((spans[0][0] + 1.2) * 16000)])
    streams = 100
    # 200 ms a batch: the flushed finals of 100 streams take a few batches, so the drain lasts long enough to be
    # checked many times.
    args = ("--engine", "fake", "--no-warmup", "--grace-period-s", "20", "--max-inference-batch-size", "64",
            "--fake-batch-delay-ms", "200")
    with running_server_process(*args, log_level="INFO") as server:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        async with grpc.aio.insecure_channel(server.address) as channel:
            async with asyncio.timeout(60):
                while (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())).status != (
                    health_pb2.HealthCheckResponse.SERVING
                ):
                    await asyncio.sleep(0.1)
            stub = pb_grpc.AsrServiceStub(channel)
            speaking = [asyncio.Event() for _ in range(streams)]
            calls = [stub.StreamingRecognize(_speak_then_hold(data, stop)) for _ in range(streams)]
            tasks = [asyncio.create_task(_collect_marking(call, started)) for call, started in zip(calls, speaking, strict=True)]
            # Every stream mid-sentence: an interim came, so its utterance is open and has been decoded from.
            async with asyncio.timeout(90):
                await asyncio.gather(*(s.wait() for s in speaking))
            answers: list[tuple[float, str]] = []
            polling = asyncio.create_task(_poll_health(server.address, answers, asyncio.Event()))
            async with asyncio.timeout(10):
                while not answers:
                    await asyncio.sleep(0.01)
            sigterm_at = loop.time()
            server.process.send_signal(signal.SIGTERM)
            outcomes = await asyncio.gather(*tasks)
            stop.set()
            async with asyncio.timeout(30):
                await polling
            assert await _until_port_closes(server.address, 5.0), "the port stayed open after health failed"
            exit_code = await asyncio.wait_for(asyncio.to_thread(server.process.wait), 30)
        stderr = server.stderr()
    assert exit_code == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"shutdown: {streams} open utterances of {streams} live streams flushed" in stderr, stderr[-3000:]
    sent = [o.server.code for o in outcomes]
    assert sent.count(grpc.StatusCode.INTERNAL) == 0, sent
    assert all(code is grpc.StatusCode.UNAVAILABLE for code in sent), sent
    assert all(len(o.finals) == 1 and o.finals[0].text for o in outcomes)
    # Health: SERVING before the SIGTERM; once the signal is handled NOT_SERVING only, until the connection went
    # with the port (connection refused), never a SERVING again nor an UNAVAILABLE answered in the drain.
    assert answers[0][1] == "SERVING"
    after = [answer for at, answer in answers if at >= sigterm_at]
    while after and after[0] == "SERVING":
        after.pop(0)  # sent before the server had handled the signal
    assert after and after[-1].startswith("error UNAVAILABLE"), after[-3:]
    assert set(after[:-1]) == {"NOT_SERVING"}, sorted(set(after))
    drain_s = next(at for at, answer in answers if answer.startswith("error")) - sigterm_at
    print(f"drain {drain_s:.2f} s, {len(after) - 1} NOT_SERVING checks")
    assert len(after) - 1 >= 5, (len(after), drain_s)  # the drain was checked throughout, not only at its end


async def _collect_marking(call: grpc.aio.StreamStreamCall, speaking: asyncio.Event) -> _Outcome:
    server = ServerStatus(call)
    responses = []
    try:
        async for response in call:
            responses.append(response)
            if response.HasField("result") and not response.result.is_final:
                speaking.set()
    except grpc.aio.AioRpcError as error:
        return _Outcome(responses, error.code(), error.details() or "", server)
    return _Outcome(responses, grpc.StatusCode.OK, "", server)
