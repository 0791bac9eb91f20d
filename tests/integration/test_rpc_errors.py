"""The one error path at the edge, over real gRPC with the fake engine: requests that are not protobuf, caller input
echoed in bounded messages, and RetryInfo on exactly the errors that retrying can cure."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, wav_bytes, with_limits, with_server

SERVICE = "/qwenasr.v1.AsrService/"
NOT_PROTOBUF = b"\xff\xff\xff"
# TranscribeRequest{config(1): RecognitionConfig{language(2): b"\xff\xfe"}}: a string field that is not UTF-8.
BAD_UTF8_CONFIG = bytes([0x0A, 4, 0x12, 2, 0xFF, 0xFE])
# StreamingRecognizeRequest{config(1): StreamingRecognitionConfig{config(1): <the RecognitionConfig above>}}.
BAD_UTF8_STREAMING_CONFIG = bytes([0x0A, 6]) + BAD_UTF8_CONFIG
LINEAR16 = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000, channel_count=1)


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.WARNING)
    yield caplog


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records that carry a traceback, or say an error: what an expected refusal must never log."""
    return [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def failure(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


def retry_info(error: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info
    return None


@pytest.mark.parametrize(
    ("method", "raw", "message_type"),
    [
        ("Transcribe", NOT_PROTOBUF, "qwenasr.v1.TranscribeRequest"),
        ("Transcribe", BAD_UTF8_CONFIG, "qwenasr.v1.TranscribeRequest"),
        ("GetServerInfo", NOT_PROTOBUF, "qwenasr.v1.GetServerInfoRequest"),
    ],
)
async def test_a_unary_request_that_is_not_its_protobuf_is_invalid_argument_without_a_traceback(
    server_log: pytest.LogCaptureFixture, method: str, raw: bytes, message_type: str
) -> None:
    async with running_server(fake_config()) as (_, channel):
        call = channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
        error = await failure(call(raw))
        # The server still answers well-formed calls.
        info = await pb_grpc.AsrServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert f"could not be parsed as {message_type}" in (error.details() or "")
    assert "UTF-8" in (error.details() or "")
    assert info.model_id == "fake"
    assert tracebacks(server_log) == []


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(BAD_UTF8_CONFIG, id="bad-utf8-first"),
        pytest.param(NOT_PROTOBUF, id="garbage-after-config"),
    ],
)
async def test_a_client_stream_message_that_is_not_protobuf_is_invalid_argument(
    server_log: pytest.LogCaptureFixture, bad: bytes
) -> None:
    good_config = pb.TranscribeStreamRequest(config=pb.RecognitionConfig(audio_format=LINEAR16)).SerializeToString()
    messages = [bad] if bad is BAD_UTF8_CONFIG else [good_config, b"\x12\x02\0\0", bad]
    async with running_server(fake_config()) as (_, channel):
        call = channel.stream_unary(SERVICE + "TranscribeStream", request_serializer=None, response_deserializer=None)
        error = await failure(call(iter(messages)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "could not be parsed as qwenasr.v1.TranscribeStreamRequest" in (error.details() or "")
    assert tracebacks(server_log) == []


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(BAD_UTF8_STREAMING_CONFIG, id="bad-utf8-first"),
        pytest.param(NOT_PROTOBUF, id="garbage-after-config"),
    ],
)
async def test_a_live_stream_message_that_is_not_protobuf_is_invalid_argument(
    server_log: pytest.LogCaptureFixture, bad: bytes
) -> None:
    config = pb.StreamingRecognizeRequest(
        config=pb.StreamingRecognitionConfig(config=pb.RecognitionConfig(audio_format=LINEAR16))
    ).SerializeToString()
    audio = pb.StreamingRecognizeRequest(audio=b"\0\0" * 320).SerializeToString()
    messages = [bad] if bad is BAD_UTF8_STREAMING_CONFIG else [config, audio, bad]
    async with running_server(fake_config()) as (_, channel):
        call = channel.stream_stream(
            SERVICE + "StreamingRecognize", request_serializer=None, response_deserializer=None
        )(iter(messages))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "could not be parsed as qwenasr.v1.StreamingRecognizeRequest" in (error.details() or "")
    assert tracebacks(server_log) == []


async def test_a_malformed_request_without_the_bearer_token_is_refused_as_unauthenticated() -> None:
    async with running_server(with_server(fake_config(), auth_token="s3cret")) as (_, channel):
        call = channel.unary_unary(SERVICE + "Transcribe", request_serializer=None, response_deserializer=None)
        error = await failure(call(NOT_PROTOBUF))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_64_kb_language_is_invalid_argument_quoting_only_its_start(
    server_log: pytest.LogCaptureFixture,
) -> None:
    language = "x" * 65_536
    request = pb.TranscribeRequest(config=pb.RecognitionConfig(language=language), audio=wav_bytes(tone(0.5)))
    async with running_server(fake_config()) as (_, channel):
        error = await failure(pb_grpc.AsrServiceStub(channel).Transcribe(request))
    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, details[:200]
    assert len(details) < 1024
    assert "unknown language 'xxxx" in details and "(65536 characters)" in details
    assert "English (en)" in details  # what is accepted is still said
    assert tracebacks(server_log) == []


async def test_audio_over_the_duration_limit_is_not_retryable_but_a_full_queue_is() -> None:
    config = with_limits(
        fake_config(max_inference_batch_size=1, max_batch_wait_ms=0, max_queued_requests=1, fake_batch_delay_ms=300),
        max_audio_duration_s=2,
    )
    async with running_server(config) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        too_long = await failure(stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(3.0)))))
        outcomes = await asyncio.gather(
            *(stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0, seed=i)))) for i in range(4)),
            return_exceptions=True,
        )
    assert too_long.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_audio_duration_s=2" in (too_long.details() or "")
    assert retry_info(too_long) is None
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert any(isinstance(o, pb.TranscribeResponse) for o in outcomes), outcomes
    assert refused, outcomes
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in (error.details() or "")
        info = retry_info(error)
        assert info is not None and info.retry_delay.ToNanoseconds() == 1_000_000_000


async def test_an_unexpected_failure_is_internal_and_logged_with_its_traceback(
    server_log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asr_server.edge import convert

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(convert, "server_info_to_pb", broken)
    async with running_server(fake_config()) as (_, channel):
        error = await failure(pb_grpc.AsrServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest()))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error: RuntimeError: boom"
    (record,) = [r for r in server_log.records if r.exc_info]
    assert record.getMessage() == "GetServerInfo failed" and record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
