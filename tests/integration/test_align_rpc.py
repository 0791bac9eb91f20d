"""The Align RPC on the tiny aligner: words equal transformers' reference alignment (alone and batched with other
alignments), and what the aligner cannot do is refused with precise statuses."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from asr_server.aligner.batcher import AlignBatcher
from asr_server.aligner.core import AlignerCore, AlignJob
from asr_server.aligner.sidecar import AlignerSidecar
from asr_server.models.loading import LoadedAlignerModel, load_aligner_model
from asr_server.models.tiny_checkpoint import TinyCheckpoints
from asr_server.results import Word
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, wav_bytes
from tests.integration.test_aligner_core import make_jobs, reference_alignment
from tests.integration.test_aligner_sidecar import connect_config, managed

FLOAT32_16K = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_FLOAT32, sample_rate_hz=16000, channel_count=1)


@pytest.fixture(scope="module")
def loaded_aligner(tiny_checkpoints: TinyCheckpoints) -> LoadedAlignerModel:
    return load_aligner_model(str(tiny_checkpoints.aligner_hf), dtype="float32", device="cpu")


class _RecordingCore(AlignerCore):
    """The real core, noting each batch's size."""

    batch_sizes: list[int]

    def align_batch(self, jobs: list[AlignJob]) -> list[tuple[Word, ...] | Exception]:
        self.batch_sizes.append(len(jobs))
        return super().align_batch(jobs)


@contextlib.asynccontextmanager
async def sidecar(loaded: LoadedAlignerModel, batch_sizes: list[int]) -> AsyncIterator[AlignerSidecar]:
    directory = Path(tempfile.mkdtemp(prefix="al-", dir="/tmp"))

    def core() -> AlignerCore:
        made = _RecordingCore(loaded)
        made.batch_sizes = batch_sizes
        return made

    # A long batch wait: concurrent Align calls are sure to share a batch.
    batcher = AlignBatcher(core, max_batch_size=8, max_batch_wait_ms=300)
    running = AlignerSidecar(batcher, listen=f"unix://{directory}/s.sock", model_id="tiny", max_batch_size=8)
    await running.start()
    try:
        yield running
    finally:
        await running.stop(grace_s=0.5)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def align_stub(loaded: LoadedAlignerModel, **limits: int) -> AsyncIterator[tuple[pb_grpc.AsrServiceStub, list[int]]]:
    batch_sizes: list[int] = []
    async with sidecar(loaded, batch_sizes) as running:
        config = connect_config(running.listen, **limits)
        async with running_server(config, aligner=managed(config)) as (_, channel):
            yield pb_grpc.AsrServiceStub(channel), batch_sizes


def align_request(samples: np.ndarray, text: str, language: str) -> pb.AlignRequest:
    return pb.AlignRequest(
        audio_format=FLOAT32_16K, audio=samples.astype("<f4").tobytes(), text=text, language=language
    )


def clamped(words: list[tuple[str, int, int]], duration_ms: int) -> list[tuple[str, int, int]]:
    # The server's documented repair of the model's times: within the audio, end never before start.
    return [(t, min(s, duration_ms), min(max(e, s), duration_ms)) for t, s, e in words]


async def test_align_equals_the_reference_alone_and_batched(loaded_aligner: LoadedAlignerModel) -> None:
    jobs = make_jobs([2.7, 9.5, 3.2, 4.0, 5.5], seed=11)
    async with align_stub(loaded_aligner) as (stub, batch_sizes):
        alone = await stub.Align(align_request(jobs[0].audio_16k, jobs[0].text, jobs[0].language))
        batched = await asyncio.gather(
            *(stub.Align(align_request(j.audio_16k, j.text, j.language)) for j in jobs)
        )
    assert batch_sizes[0] == 1 and max(batch_sizes[1:]) > 1, batch_sizes
    for job, response in zip([jobs[0], *jobs], [alone, *batched], strict=True):
        duration_ms = round(job.audio_s * 1000)
        expected = clamped(reference_alignment(loaded_aligner, job.audio_16k, job.text, job.language), duration_ms)
        assert [(w.text, w.start_ms, w.end_ms) for w in response.words] == expected
        assert response.word_timestamps_status == pb.WORD_TIMESTAMPS_STATUS_OK
        assert response.audio_duration_ms == duration_ms
        assert response.aligner_model_id == "tiny" and len(response.request_id) == 16
        assert response.timing.alignment_ms > 0 and response.timing.total_ms >= response.timing.alignment_ms
        assert response.timing.alignment_work_ms == response.timing.alignment_ms


async def test_align_takes_the_transcribe_formats_and_codes(loaded_aligner: LoadedAlignerModel) -> None:
    samples = tone(3.0, seed=4)
    text = "hello world again"
    async with align_stub(loaded_aligner) as (stub, _):
        wav = await stub.Align(pb.AlignRequest(audio=wav_bytes(samples), text=text, language="en-US"))
        raw = await stub.Align(align_request(samples, text, "English"))
    assert [w.text for w in wav.words] == ["hello", "world", "again"]
    assert wav.audio_duration_ms == raw.audio_duration_ms == 3000
    assert wav.word_timestamps_status == pb.WORD_TIMESTAMPS_STATUS_OK


async def test_text_without_words_is_ok_with_no_text(loaded_aligner: LoadedAlignerModel) -> None:
    async with align_stub(loaded_aligner) as (stub, _):
        response = await stub.Align(align_request(tone(1.0, seed=2), "?! ...", "English"))
    assert not response.words and response.word_timestamps_status == pb.WORD_TIMESTAMPS_STATUS_NO_TEXT


async def _status(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


async def test_what_the_aligner_cannot_do_is_refused_precisely(loaded_aligner: LoadedAlignerModel) -> None:
    samples = tone(2.0, seed=1)
    async with align_stub(loaded_aligner, max_chunk_with_timestamps_s=5) as (stub, _):
        no_language = await _status(stub.Align(align_request(samples, "hello", "")))
        thai = await _status(stub.Align(align_request(samples, "hello", "th")))
        unknown = await _status(stub.Align(align_request(samples, "hello", "klingon")))
        empty = await _status(stub.Align(align_request(samples, " \n ", "en")))
        too_many = await _status(stub.Align(align_request(samples, " ".join(["word"] * 26), "en")))
        too_long = await _status(stub.Align(align_request(tone(6.0, seed=1), "hello", "en")))
        bad_audio = await _status(stub.Align(pb.AlignRequest(audio=b"not audio at all", text="hello", language="en")))
        fits = await stub.Align(align_request(samples, " ".join(["word"] * 25), "en"))
    for code, message in (no_language, thai, unknown):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "Spanish (es)" in message and "Cantonese (yue)" in message and "Arabic" not in message
    assert "Thai" in thai[1] and "'klingon'" in unknown[1]
    assert empty[0] == grpc.StatusCode.INVALID_ARGUMENT and "text is empty" in empty[1]
    assert too_many[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "26 words" in too_many[1] and "80 ms" in too_many[1] and "25 words" in too_many[1]
    assert too_long[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "6.0 s" in too_long[1] and "limit of 5 s" in too_long[1] and "max_chunk_duration_with_timestamps_s" in too_long[1]
    assert bad_audio[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert len(fits.words) == 25  # the limit itself is accepted


async def test_align_without_an_aligner_is_a_failed_precondition() -> None:
    async with running_server(fake_config()) as (_, channel):
        code, message = await _status(
            pb_grpc.AsrServiceStub(channel).Align(align_request(tone(1.0), "hello", "en"))
        )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "--aligner-model" in message
