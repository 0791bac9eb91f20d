"""The whole server over real gRPC with the fake engine: contract, batching across RPCs, errors, auth."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
import pytest

from asr_server.engine.fake import FakeEngine, fake_transcript
from asr_server.engine.types import DecodeOptions, DecodeRequest
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, wav_bytes, with_limits, with_server


def expected_text(samples: np.ndarray) -> str:
    # The fake engine's words for 16 kHz mono audio that is decoded as one chunk.
    return fake_transcript(DecodeRequest("x", samples, DecodeOptions(None, "", 4096)))[0]


def wav_request(samples: np.ndarray, **config: object) -> pb.TranscribeRequest:
    return pb.TranscribeRequest(config=pb.RecognitionConfig(**config), audio=wav_bytes(samples))  # type: ignore[arg-type]


async def test_transcribe_wav_returns_the_engine_text_language_and_duration() -> None:
    samples = tone(3.0, seed=1)
    async with running_server(fake_config()) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        response = await stub.Transcribe(wav_request(samples, language="en"))
    (transcript,) = response.transcripts
    assert transcript.text == expected_text(wav_roundtrip(samples))
    assert transcript.text.count("w") == 6
    assert transcript.language == "English"
    assert response.audio_duration_ms == 3000
    assert response.model_id == "fake"
    assert [(s.start_ms, s.end_ms) for s in transcript.segments] == [(0, 3000)]


def wav_roundtrip(samples: np.ndarray) -> np.ndarray:
    return (np.clip(np.round(samples * 32767), -32768, 32767).astype(np.int16) / 32768.0).astype(np.float32)


async def test_concurrent_rpcs_are_batched_together_and_each_gets_its_own_result() -> None:
    cores: list[FakeEngine] = []

    def factory() -> FakeEngine:
        cores.append(FakeEngine(max_batch_size=16, batch_delay_ms=50))
        return cores[-1]

    clips = [tone(0.5 + 0.25 * i, seed=i) for i in range(16)]
    async with running_server(fake_config(max_inference_batch_size=16, max_batch_wait_ms=200), core_factory=factory) as (
        _,
        channel,
    ):
        stub = pb_grpc.AsrServiceStub(channel)
        responses = await asyncio.gather(*(stub.Transcribe(wav_request(c)) for c in clips))
    for clip, response in zip(clips, responses, strict=True):
        assert response.transcripts[0].text == expected_text(wav_roundtrip(clip))
    assert max(len(batch) for batch in cores[0].batches) >= 8, cores[0].batches


async def test_transcribe_stream_assembles_frames_of_any_size() -> None:
    samples = tone(2.0, seed=3)
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2").tobytes()
    fmt = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000, channel_count=1)

    async def requests():  # type: ignore[no-untyped-def]
        yield pb.TranscribeStreamRequest(config=pb.RecognitionConfig(audio_format=fmt))
        rng = np.random.default_rng(0)
        position = 0
        while position < len(pcm):
            size = int(rng.integers(1, 997))  # odd sizes split samples
            yield pb.TranscribeStreamRequest(audio=pcm[position : position + size])
            position += size

    async with running_server(fake_config()) as (_, channel):
        response = await pb_grpc.AsrServiceStub(channel).TranscribeStream(requests())
    assert response.transcripts[0].text == expected_text(wav_roundtrip(samples))
    assert response.audio_duration_ms == 2000


async def test_server_info_lists_languages_limits_and_features() -> None:
    config = with_limits(fake_config(), max_audio_duration_s=600)
    config = dataclasses.replace(config, streaming=dataclasses.replace(config.streaming, idle_timeout_s=12.5, max_duration_s=3600.5))
    async with running_server(config) as (_, channel):
        info = await pb_grpc.AsrServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest())
    assert len(info.languages) == 30
    assert {"English", "Chinese", "Macedonian"} <= {lang.name for lang in info.languages}
    assert len(info.aligner_languages) == 11
    assert info.limits.max_audio_duration_s == 600
    assert info.limits.max_new_tokens == 8192
    assert info.limits.stream_idle_timeout_ms == 12500
    assert info.limits.max_stream_duration_ms == 3_600_500
    assert info.limits.max_decoded_audio_bytes == 2048 * 1024 * 1024
    assert info.features.word_timestamps is False
    assert info.api_version == "qwenasr.v1"
    assert "WAV" in info.container_formats


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    assert isinstance(error, grpc.aio.AioRpcError), error
    return error.code(), error.details() or ""


async def single_stream(stub: pb_grpc.AsrServiceStub, messages: list[pb.TranscribeStreamRequest]) -> pb.TranscribeResponse:
    async def gen():  # type: ignore[no-untyped-def]
        for m in messages:
            yield m

    return await stub.TranscribeStream(gen())


LINEAR16 = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000, channel_count=1)


@pytest.mark.parametrize(
    ("name", "make_call", "code", "needle"),
    [
        ("undecodable", lambda s: s.Transcribe(pb.TranscribeRequest(audio=b"this is not audio" * 50)),
         grpc.StatusCode.INVALID_ARGUMENT, "audio"),
        ("empty", lambda s: s.Transcribe(pb.TranscribeRequest(config=pb.RecognitionConfig(audio_format=LINEAR16))),
         grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        ("unknown language", lambda s: s.Transcribe(wav_request(tone(1.0), language="Klingon")),
         grpc.StatusCode.INVALID_ARGUMENT, "English (en)"),
        ("max_new_tokens", lambda s: s.Transcribe(wav_request(tone(1.0), max_new_tokens=100_000)),
         grpc.StatusCode.INVALID_ARGUMENT, "1 to 8192"),
        ("config missing", lambda s: single_stream(s, [pb.TranscribeStreamRequest(audio=b"\0\0" * 100)]),
         grpc.StatusCode.INVALID_ARGUMENT, "first TranscribeStreamRequest must carry config"),
        ("config repeated", lambda s: single_stream(s, [
            pb.TranscribeStreamRequest(config=pb.RecognitionConfig(audio_format=LINEAR16)),
            pb.TranscribeStreamRequest(audio=b"\0\0" * 100),
            pb.TranscribeStreamRequest(config=pb.RecognitionConfig(audio_format=LINEAR16)),
        ]), grpc.StatusCode.INVALID_ARGUMENT, "only once"),
        ("stream empty", lambda s: single_stream(s, []), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        ("over size limit", lambda s: s.Transcribe(pb.TranscribeRequest(
            config=pb.RecognitionConfig(audio_format=LINEAR16), audio=b"\0" * 300_000)),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "200000"),
        ("over stream limit", lambda s: single_stream(s, [
            pb.TranscribeStreamRequest(config=pb.RecognitionConfig(audio_format=LINEAR16)),
            *[pb.TranscribeStreamRequest(audio=b"\0" * 100_000) for _ in range(5)],
        ]), grpc.StatusCode.RESOURCE_EXHAUSTED, "400000"),
        ("unknown encoding", lambda s: s.Transcribe(pb.TranscribeRequest(
            config=pb.RecognitionConfig(audio_format=pb.AudioFormat(encoding=99, sample_rate_hz=16000, channel_count=1)),
            audio=b"\0\0" * 100)), grpc.StatusCode.INVALID_ARGUMENT, "AUDIO_ENCODING_LINEAR16"),
        ("timestamps without aligner", lambda s: s.Transcribe(wav_request(tone(1.0), return_word_timestamps=True)),
         grpc.StatusCode.FAILED_PRECONDITION, "--aligner-model"),
    ],
)
async def test_bad_input_gets_a_precise_status_while_good_requests_succeed(name, make_call, code, needle) -> None:  # type: ignore[no-untyped-def]
    config = with_limits(fake_config(), max_message_bytes=200_000, max_stream_bytes=400_000)
    good = tone(1.5, seed=7)
    async with running_server(config) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        outcomes = await asyncio.gather(
            stub.Transcribe(wav_request(good)), make_call(stub), stub.Transcribe(wav_request(good)),
            return_exceptions=True,
        )
    bad_code, details = status_of(outcomes[1])
    assert bad_code == code, (name, details)
    assert needle in details, (name, details)
    for ok in (outcomes[0], outcomes[2]):
        assert isinstance(ok, pb.TranscribeResponse), ok
        assert ok.transcripts[0].text == expected_text(wav_roundtrip(good))


async def test_auth_token_is_required_except_for_health() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    config = with_server(fake_config(), auth_token="s3cret")
    async with running_server(config) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Transcribe(wav_request(tone(1.0)))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as caught_stream:
            await single_stream(stub, [pb.TranscribeStreamRequest(config=pb.RecognitionConfig())])
        assert caught_stream.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = await stub.Transcribe(wav_request(tone(1.0)), metadata=[("authorization", "Bearer s3cret")])
        assert ok.transcripts[0].text
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_cancelled_call_frees_its_queued_work() -> None:
    cores: list[FakeEngine] = []

    def factory() -> FakeEngine:
        cores.append(FakeEngine(max_batch_size=1, batch_delay_ms=300))
        return cores[-1]

    async with running_server(fake_config(max_inference_batch_size=1, max_batch_wait_ms=0), core_factory=factory) as (
        _,
        channel,
    ):
        stub = pb_grpc.AsrServiceStub(channel)
        first = asyncio.ensure_future(stub.Transcribe(wav_request(tone(1.0, seed=1))))
        await asyncio.sleep(0.05)
        doomed = stub.Transcribe(wav_request(tone(1.0, seed=2)))
        await asyncio.sleep(0.1)
        doomed.cancel()
        await first
        await asyncio.sleep(0.4)
    # The cancelled call's audio never reached a batch.
    assert len(cores[0].batches) == 1
