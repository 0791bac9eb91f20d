"""Request ids: the caller's x-request-id (or a generated one) in the responses, the response header, the RPC's span
and the access log line, all the same id."""

from __future__ import annotations

import json
import logging
import re

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from asr_server.edge.rpc import _valid_request_id
from asr_server.logs import ACCESS_LOGGER
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, wav_bytes
from tests.integration.test_tracing import exporter  # noqa: F401 - the span-recording fixture
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import audio_requests, pcm16, stream_config

_ID = re.compile(r'request_id=("(?:[^"\\]|\\.)*"|\S+)')


def _access_ids(caplog: pytest.LogCaptureFixture, method: str) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER and f"method={method}" in r.getMessage()]
    # key=value, a value with spaces in double quotes
    return [json.loads(m) if m.startswith('"') else m for m in (_ID.search(line).group(1) for line in lines)]  # type: ignore[union-attr]


def _span_ids(exporter: InMemorySpanExporter, method: str) -> list[str]:  # noqa: F811 - not the fixture
    return [
        str(s.attributes.get("asr.request_id"))
        for s in exporter.get_finished_spans()
        if s.name.endswith(f"/{method}") and s.attributes is not None
    ]


async def test_the_callers_id_is_echoed_in_the_response_header_span_and_access_log(
    caplog: pytest.LogCaptureFixture, exporter: InMemorySpanExporter  # noqa: F811 - the fixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with running_server(fake_config()) as (_, channel):
        call = pb_grpc.AsrServiceStub(channel).Transcribe(
            pb.TranscribeRequest(audio=wav_bytes(tone(0.5))), metadata=(("x-request-id", "call-7 from ivr"),)
        )
        response = await call
        header = dict(await call.initial_metadata())
    assert response.request_id == "call-7 from ivr"
    assert header["x-request-id"] == "call-7 from ivr"
    assert _access_ids(caplog, "Transcribe") == ["call-7 from ivr"]
    assert _span_ids(exporter, "Transcribe") == ["call-7 from ivr"]


async def test_without_an_id_the_server_generates_one_shared_by_response_span_and_log(
    caplog: pytest.LogCaptureFixture, exporter: InMemorySpanExporter  # noqa: F811 - the fixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with running_server(fake_config()) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        first = await stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(0.5))))
        second = await stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(0.5))))
    ids = [first.request_id, second.request_id]
    assert all(len(i) == 16 for i in ids) and ids[0] != ids[1]
    assert sorted(_access_ids(caplog, "Transcribe")) == sorted(ids)
    assert sorted(_span_ids(exporter, "Transcribe")) == sorted(ids)


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
async def test_every_streaming_response_carries_the_id() -> None:
    audio, _ = synthesize_sentences(["hello there, this is a test"], silence_s=1.0)
    async with running_server(fake_config()) as (_, channel):
        requests = audio_requests(pcm16(audio), bytes_per_ms=32, piece_ms=100, head=[stream_config()])
        call = pb_grpc.AsrServiceStub(channel).StreamingRecognize(requests, metadata=(("x-request-id", "live-1"),))
        responses = [r async for r in call]
    assert any(r.HasField("result") and r.result.is_final for r in responses)
    assert {r.request_id for r in responses} == {"live-1"}


def test_ids_are_printable_ascii_of_1_to_128_characters() -> None:
    # gRPC clients refuse to send control characters or non-ASCII text metadata; the server checks anyway.
    assert _valid_request_id("x" * 128) and _valid_request_id("a b/c:d")
    assert not any(_valid_request_id(v) for v in ("x" * 129, "", "tab\there", "caf\u00e9", b"raw"))


async def test_an_overlong_id_is_invalid_argument_saying_what_is_accepted(caplog: pytest.LogCaptureFixture) -> None:
    bad = "x" * 129
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with running_server(fake_config()) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        metadata = (("x-request-id", bad),)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(0.5))), metadata=metadata)
        ok = await stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(0.5))), metadata=(("x-request-id", "k"),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-request-id" in (info.value.details() or "") and "128 printable ASCII" in (info.value.details() or "")
    assert ok.request_id == "k"
    refused = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER and "INVALID_ARGUMENT" in r.getMessage()]
    assert len(refused) == 1 and len(_ID.search(refused[0]).group(1)) == 16  # type: ignore[union-attr]
