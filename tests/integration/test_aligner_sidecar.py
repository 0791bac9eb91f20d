"""Word timestamps through the aligner sidecar over a unix socket: parity, invariants, and the user-visible
behaviours (no aligner, unsupported language, missing word splitter, aligner down).

The sidecar runs in this process here (its gRPC server on the test's event loop, its model on its own thread), so
the tests are fast; test_aligner_supervisor.py runs it as a real child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr_server.aligner import sidecar as sidecar_module
from asr_server.aligner.batcher import AlignBatcher
from asr_server.aligner.client import CHANNEL_OPTIONS, SidecarClient
from asr_server.aligner.core import AlignerCore
from asr_server.aligner.managed import WORD_TIMESTAMPS_HEALTH_SERVICE, SidecarAligner
from asr_server.aligner.sidecar import AlignerSidecar
from asr_server.config import AlignerConfig, Config
from asr_server.engine.core import EngineOutput
from asr_server.engine.fake import FakeEngine
from asr_server.models.loading import LoadedAlignerModel, load_aligner_model
from asr_server.models.tiny_checkpoint import TinyCheckpoints
from qwenasr.aligner.v1 import aligner_pb2, aligner_pb2_grpc
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, with_limits
from tests.integration.test_aligner_core import TEXTS, make_jobs, reference_alignment


@pytest.fixture(scope="module")
def loaded_aligner(tiny_checkpoints: TinyCheckpoints) -> LoadedAlignerModel:
    return load_aligner_model(str(tiny_checkpoints.aligner_hf), dtype="float32", device="cpu")


@contextlib.asynccontextmanager
async def sidecar_at_unix_socket(
    loaded: LoadedAlignerModel, *, max_batch_wait_ms: float = 5.0
) -> AsyncIterator[AlignerSidecar]:
    # A short path: unix socket paths are limited to 107 bytes, pytest's tmp_path can be longer.
    directory = Path(tempfile.mkdtemp(prefix="al-", dir="/tmp"))
    batcher = AlignBatcher(lambda: AlignerCore(loaded), max_batch_size=8, max_batch_wait_ms=max_batch_wait_ms)
    sidecar = AlignerSidecar(batcher, listen=f"unix://{directory}/s.sock", model_id="tiny", max_batch_size=8)
    await sidecar.start()
    try:
        yield sidecar
    finally:
        await sidecar.stop(grace_s=0.5)
        shutil.rmtree(directory, ignore_errors=True)


def connect_config(address: str, **limits: int) -> Config:
    config = with_limits(fake_config(), **limits) if limits else fake_config()
    return dataclasses.replace(
        config, aligner=AlignerConfig(model="tiny", mode="connect", address=address, timeout_s=30)
    )


def managed(config: Config, *, ready_wait_s: float = 10.0) -> SidecarAligner:
    return SidecarAligner(config.aligner, ready_wait_s=ready_wait_s, poll_interval_s=0.1)


def float32_request(samples: np.ndarray, **config: object) -> pb.TranscribeRequest:
    audio_format = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_FLOAT32, sample_rate_hz=16000, channel_count=1)
    return pb.TranscribeRequest(
        config=pb.RecognitionConfig(audio_format=audio_format, **config),  # type: ignore[arg-type]
        audio=samples.astype("<f4").tobytes(),
    )


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    assert isinstance(error, grpc.aio.AioRpcError), error
    return error.code(), error.details() or ""


# ---- parity through the sidecar ----


async def test_sidecar_timestamps_equal_reference_single_and_batched(loaded_aligner: LoadedAlignerModel) -> None:
    async with sidecar_at_unix_socket(loaded_aligner, max_batch_wait_ms=300) as sidecar:
        client = SidecarClient(sidecar.listen, timeout_s=30, ready_wait_s=10, poll_interval_s=0.1)
        await client.start()
        channel = grpc.aio.insecure_channel(sidecar.listen, options=CHANNEL_OPTIONS)
        try:
            jobs = make_jobs([0.3, 2.7, 9.5, 1.2, 4.0], seed=5)
            single = await client.align(jobs[1].audio_16k, jobs[1].text, jobs[1].language)
            assert [(w.text, w.start_ms, w.end_ms) for w in single.words] == reference_alignment(
                loaded_aligner, jobs[1].audio_16k, jobs[1].text, jobs[1].language
            )
            stub = aligner_pb2_grpc.AlignerServiceStub(channel)
            responses = await asyncio.gather(
                *(
                    stub.Align(
                        aligner_pb2.AlignRequest(
                            audio_f32le=job.audio_16k.astype("<f4").tobytes(), text=job.text, language=job.language
                        )
                    )
                    for job in jobs
                )
            )
            assert max(r.batch_size for r in responses) > 1
            for job, response in zip(jobs, responses, strict=True):
                got = [(w.text, w.start_ms, w.end_ms) for w in response.words]
                assert got == reference_alignment(loaded_aligner, job.audio_16k, job.text, job.language)
        finally:
            await channel.close()
            await client.stop()


async def test_sidecar_over_tcp_for_a_separate_container(loaded_aligner: LoadedAlignerModel) -> None:
    batcher = AlignBatcher(lambda: AlignerCore(loaded_aligner), max_batch_size=4, max_batch_wait_ms=5)
    sidecar = AlignerSidecar(batcher, listen="127.0.0.1:0", model_id="tiny", max_batch_size=4)
    await sidecar.start()
    try:
        config = dataclasses.replace(
            fake_config(),
            aligner=AlignerConfig(model="tiny", mode="connect", address=f"127.0.0.1:{sidecar.port}", timeout_s=30),
        )
        (job,) = make_jobs([3.0], seed=9)
        async with running_server(config, aligner=managed(config)) as (_, channel):
            response = await pb_grpc.AsrServiceStub(channel).Transcribe(
                float32_request(job.audio_16k, language="en", return_word_timestamps=True)
            )
        (transcript,) = response.transcripts
        assert transcript.word_timestamps_status == pb.WORD_TIMESTAMPS_STATUS_OK
        expected = reference_alignment(loaded_aligner, job.audio_16k, transcript.text, "English")
        assert [(w.text, w.start_ms, w.end_ms) for w in transcript.words] == [
            (text, min(start, 3000), min(end, 3000)) for text, start, end in expected
        ]
    finally:
        await sidecar.stop(grace_s=0.5)


async def test_sidecar_refuses_bad_requests_precisely(loaded_aligner: LoadedAlignerModel) -> None:
    async with sidecar_at_unix_socket(loaded_aligner) as sidecar:
        channel = grpc.aio.insecure_channel(sidecar.listen, options=CHANNEL_OPTIONS)
        stub = aligner_pb2_grpc.AlignerServiceStub(channel)
        try:
            audio = np.zeros(16000, dtype="<f4").tobytes()
            cases = [
                (aligner_pb2.AlignRequest(audio_f32le=audio, text="hi", language="Thai"), "does not cover"),
                (aligner_pb2.AlignRequest(audio_f32le=audio[:-1], text="hi", language="English"), "multiple of 4"),
                (
                    aligner_pb2.AlignRequest(
                        audio_f32le=np.zeros(16000 * 301, "<f4").tobytes(), text="a", language="English"
                    ),
                    "longer than",
                ),
                (
                    aligner_pb2.AlignRequest(
                        audio_f32le=np.array([0.1, np.nan] * 800, "<f4").tobytes(), text="hi", language="English"
                    ),
                    "NaN",
                ),
            ]
            for request, needle in cases:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Align(request)
                assert status_of(info.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
                assert needle in status_of(info.value)[1]
            info_response = await stub.GetAlignerInfo(aligner_pb2.GetAlignerInfoRequest())
            assert info_response.model_id == "tiny" and "English" in info_response.languages
        finally:
            await channel.close()


# ---- through the ASR server ----


async def test_word_timestamps_of_a_long_recording_hold_the_invariants(loaded_aligner: LoadedAlignerModel) -> None:
    samples = tone(95.0, seed=3)
    samples[int(31.2 * 16000) : int(31.6 * 16000)] = 0.0  # a quiet point near the first 30 s cut
    async with sidecar_at_unix_socket(loaded_aligner) as sidecar:
        config = connect_config(sidecar.listen, max_chunk_with_timestamps_s=30)
        async with running_server(config, aligner=managed(config)) as (_, channel):
            response = await pb_grpc.AsrServiceStub(channel).Transcribe(
                float32_request(samples, return_word_timestamps=True)
            )
        (transcript,) = response.transcripts
        assert transcript.word_timestamps_status == pb.WORD_TIMESTAMPS_STATUS_OK
        assert len(transcript.segments) >= 3
        duration_ms = response.audio_duration_ms
        assert duration_ms == 95000
        words = list(transcript.words)
        assert words and [w for s in transcript.segments for w in s.words] == words
        times = [t for w in words for t in (w.start_ms, w.end_ms)]
        assert all(w.start_ms <= w.end_ms for w in words)
        assert times == sorted(times), "times must not go back, within a chunk or across chunk boundaries"
        assert 0 <= times[0] and times[-1] <= duration_ms
        # Each segment's words are the sidecar's words for exactly that chunk, clamped to it, shifted by its start.
        client = SidecarClient(sidecar.listen, timeout_s=30, ready_wait_s=10, poll_interval_s=0.1)
        await client.start()
        try:
            for segment in transcript.segments:
                assert all(segment.start_ms <= w.start_ms <= w.end_ms <= segment.end_ms for w in segment.words)
                chunk = samples[segment.start_ms * 16 : segment.end_ms * 16]
                direct = await client.align(chunk, segment.text, "English")
                length = segment.end_ms - segment.start_ms
                expected = [
                    (w.text, min(w.start_ms, length) + segment.start_ms, min(w.end_ms, length) + segment.start_ms)
                    for w in direct.words
                ]
                assert [(w.text, w.start_ms, w.end_ms) for w in segment.words] == expected
        finally:
            await client.stop()
        assert response.timing.alignment_ms > 0


async def test_timestamps_without_an_aligner_are_a_failed_precondition_saying_how_to_enable_them() -> None:
    async with running_server(fake_config()) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Transcribe(float32_request(tone(2.0, seed=1), return_word_timestamps=True))
        code, message = status_of(info.value)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "--aligner-model" in message
        server_info = await stub.GetServerInfo(pb.GetServerInfoRequest())
        assert not server_info.features.word_timestamps and not server_info.features.aligner_ready
        plain = await stub.Transcribe(float32_request(tone(2.0, seed=1)))
        assert plain.transcripts[0].text


class DetectsArabic(FakeEngine):
    """The fake engine, but every piece of audio is 'detected' as Arabic, which the aligner does not cover."""

    def step(self) -> list[EngineOutput]:
        outputs = super().step()
        return [
            dataclasses.replace(o, result=dataclasses.replace(o.result, language="Arabic")) if o.result else o
            for o in outputs
        ]


async def test_a_language_the_aligner_does_not_cover_gives_the_transcript_without_words(
    loaded_aligner: LoadedAlignerModel,
) -> None:
    samples = tone(3.0, seed=2)
    async with sidecar_at_unix_socket(loaded_aligner) as sidecar:
        config = connect_config(sidecar.listen)
        async with running_server(config, aligner=managed(config)) as (_, channel):
            stub = pb_grpc.AsrServiceStub(channel)
            forced = await stub.Transcribe(float32_request(samples, language="th", return_word_timestamps=True))
            english = await stub.Transcribe(float32_request(samples, language="en", return_word_timestamps=True))
        (transcript,) = forced.transcripts
        assert transcript.text and transcript.language == "Thai"
        assert not transcript.words
        assert transcript.word_timestamps_status == pb.WORD_TIMESTAMPS_STATUS_LANGUAGE_NOT_SUPPORTED
        assert english.transcripts[0].word_timestamps_status == pb.WORD_TIMESTAMPS_STATUS_OK
        assert english.transcripts[0].text == transcript.text

        async with running_server(
            config, core_factory=lambda: DetectsArabic(max_batch_size=4), aligner=managed(config)
        ) as (_, channel):
            detected = await pb_grpc.AsrServiceStub(channel).Transcribe(
                float32_request(samples, return_word_timestamps=True)
            )
        (transcript,) = detected.transcripts
        assert transcript.text and transcript.language == "Arabic" and not transcript.words
        assert transcript.word_timestamps_status == pb.WORD_TIMESTAMPS_STATUS_LANGUAGE_NOT_SUPPORTED


class DetectsNoLanguage(FakeEngine):
    """The fake engine, but no language is detected for any text (the model's first line was not "language X")."""

    def step(self) -> list[EngineOutput]:
        outputs = super().step()
        return [
            dataclasses.replace(o, result=dataclasses.replace(o.result, language="")) if o.result else o
            for o in outputs
        ]


async def test_text_with_no_detected_language_is_aligned_as_the_reference_aligns_it(
    loaded_aligner: LoadedAlignerModel,
) -> None:
    samples = tone(3.0, seed=5)
    async with sidecar_at_unix_socket(loaded_aligner) as sidecar:
        config = connect_config(sidecar.listen)
        async with running_server(
            config, core_factory=lambda: DetectsNoLanguage(max_batch_size=4), aligner=managed(config)
        ) as (_, channel):
            response = await pb_grpc.AsrServiceStub(channel).Transcribe(
                float32_request(samples, return_word_timestamps=True)
            )
    (transcript,) = response.transcripts
    assert transcript.text and transcript.language == "" and transcript.language_code == ""
    assert transcript.word_timestamps_status == pb.WORD_TIMESTAMPS_STATUS_OK
    # The reference's words and times for the same text with no language (clamped to the audio, as all words are).
    expected = [
        (w, min(start, 3000), min(max(end, start), 3000))
        for w, start, end in reference_alignment(loaded_aligner, samples, transcript.text, None)
    ]
    assert [(w.text, w.start_ms, w.end_ms) for w in transcript.words] == expected
    assert [w for w, _, _ in expected] == transcript.text.split()


@pytest.mark.parametrize(("language", "module", "extra"), [("ja", "nagisa", "ja"), ("ko", "soynlp", "ko")])
async def test_japanese_or_korean_without_their_extra_is_a_failed_precondition_naming_it(
    loaded_aligner: LoadedAlignerModel, monkeypatch: pytest.MonkeyPatch, language: str, module: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed where the sidecar runs
    async with sidecar_at_unix_socket(loaded_aligner) as sidecar:
        config = connect_config(sidecar.listen)
        async with running_server(config, aligner=managed(config)) as (_, channel):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.AsrServiceStub(channel).Transcribe(
                    float32_request(tone(2.0, seed=4), language=language, return_word_timestamps=True)
                )
    code, message = status_of(info.value)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"pip install 'qwen-asr-server[{extra}]'" in message


async def health_of(channel: grpc.aio.Channel, service: str) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


async def wait_until(predicate: object, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_health_and_server_info_follow_the_aligner(loaded_aligner: LoadedAlignerModel) -> None:
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    samples = tone(2.0, seed=6)
    async with sidecar_at_unix_socket(loaded_aligner) as sidecar:
        config = connect_config(sidecar.listen)
        aligner = managed(config, ready_wait_s=0.5)
        async with running_server(config, aligner=aligner) as (_, channel):
            stub = pb_grpc.AsrServiceStub(channel)
            await wait_until(lambda: aligner.ready)
            await asyncio.sleep(0.05)
            assert await health_of(channel, WORD_TIMESTAMPS_HEALTH_SERVICE) == SERVING
            info = await stub.GetServerInfo(pb.GetServerInfoRequest())
            assert info.features.word_timestamps and info.features.aligner_ready
            assert info.aligner_model_id == "tiny"

            await sidecar.stop(grace_s=0.1)  # the aligner goes away
            await wait_until(lambda: not aligner.ready)
            await asyncio.sleep(0.05)
            assert await health_of(channel, WORD_TIMESTAMPS_HEALTH_SERVICE) == NOT_SERVING
            assert await health_of(channel, "") == SERVING  # transcription without timestamps goes on
            info = await stub.GetServerInfo(pb.GetServerInfoRequest())
            assert info.features.word_timestamps and not info.features.aligner_ready
            started = asyncio.get_running_loop().time()
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Transcribe(float32_request(samples, return_word_timestamps=True))
            assert status_of(error.value)[0] == grpc.StatusCode.UNAVAILABLE
            assert "not ready" in status_of(error.value)[1]
            assert asyncio.get_running_loop().time() - started < 5.0
            plain = await stub.Transcribe(float32_request(samples))
            assert plain.transcripts[0].text


def test_texts_cover_cjk_and_spaced_languages() -> None:
    assert {language for _, language in TEXTS} >= {"English", "Chinese"}


async def test_the_aligner_command_freezes_the_heap_once_loaded_and_before_serving(
    loaded_aligner: LoadedAlignerModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asr_server/heap.py: the `asr-server aligner` command freezes; servers tests start in-process never do.
    statuses: list[int] = []
    batcher = AlignBatcher(lambda: AlignerCore(loaded_aligner), max_batch_size=4, max_batch_wait_ms=1.0)
    sidecar = AlignerSidecar(batcher, listen="127.0.0.1:0", model_id="tiny", max_batch_size=4)

    def record(process: str) -> int:
        assert process == "aligner sidecar"
        # grpc_health's servicer keeps no public getter for what it would answer; its status table is read here.
        statuses.append(sidecar.health._server_status[""])
        return 0

    monkeypatch.setattr(sidecar_module, "freeze_startup_heap", record)
    await sidecar.start(load=False)
    try:
        await sidecar.load(freeze_heap=True)
        assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
        assert sidecar.health._server_status[""] == health_pb2.HealthCheckResponse.SERVING
    finally:
        await sidecar.stop(grace_s=0.5)
