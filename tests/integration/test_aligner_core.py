"""Parity of the aligner core with transformers' reference path, alone and in batches."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asr_server.aligner.batcher import AlignBatcher
from asr_server.aligner.core import AlignerCore, AlignJob, Prepared
from asr_server.errors import FailedPrecondition
from asr_server.models.loading import LoadedAlignerModel, load_aligner_model
from asr_server.models.tiny_checkpoint import TinyCheckpoints

Timed = list[tuple[str, int, int]]

TEXTS = (
    ("hello world, this is a test of the aligner", "English"),
    ("今天天气很好，我们去公园散步吧。", "Chinese"),
    ("Bonjour le monde", "French"),
    ("the quick brown fox jumps over the lazy dog again and again and again", "English"),
    ("Mixed: 我喜欢 Python 和 machine learning", "Chinese"),
)


def reference_alignment(loaded: LoadedAlignerModel, audio: np.ndarray, text: str, language: str | None) -> Timed:
    """transformers' documented path: prepare_forced_aligner_inputs -> model -> decode_forced_alignment. `language`
    None: no language known (the reference's default word splitting)."""
    import torch

    processor, model = loaded.processor, loaded.model
    inputs, word_lists = processor.prepare_forced_aligner_inputs(
        audio=[audio], transcript=[text], language=None if language is None else [language]
    )
    with torch.inference_mode():
        logits = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            input_features=inputs["input_features"],
            input_features_mask=inputs["input_features_mask"],
        ).logits
    decoded = processor.decode_forced_alignment(
        logits, inputs["input_ids"], word_lists, timestamp_token_id=model.config.timestamp_token_id
    )[0]
    return [(w["text"], round(w["start_time"] * 1000), round(w["end_time"] * 1000)) for w in decoded]


def as_timed(words: Any) -> Timed:
    if isinstance(words, Exception):
        raise words
    return [(w.text, w.start_ms, w.end_ms) for w in words]


def make_jobs(durations: list[float], seed: int = 0) -> list[AlignJob]:
    rng = np.random.default_rng(seed)
    jobs = []
    for index, duration in enumerate(durations):
        t = np.arange(int(duration * 16000)) / 16000
        audio = (0.2 * np.sin(2 * np.pi * (200 + 50 * index) * t) + 0.05 * rng.standard_normal(t.size)).astype(
            np.float32
        )
        text, language = TEXTS[index % len(TEXTS)]
        jobs.append(AlignJob(str(index), audio, text, language))
    return jobs


@pytest.fixture(scope="module", params=["hf", "original"])
def loaded(request: pytest.FixtureRequest, tiny_checkpoints: TinyCheckpoints) -> LoadedAlignerModel:
    path: Path = tiny_checkpoints.aligner_hf if request.param == "hf" else tiny_checkpoints.aligner_original
    return load_aligner_model(str(path), dtype="float32", device="cpu")


def test_single_requests_equal_reference(loaded: LoadedAlignerModel) -> None:
    core = AlignerCore(loaded)
    for job in make_jobs([0.3, 2.7, 9.5]):
        assert as_timed(core.align_batch([job])[0]) == reference_alignment(
            loaded, job.audio_16k, job.text, job.language
        )


def test_text_with_no_language_is_split_and_timed_as_the_reference_does_without_one(
    loaded: LoadedAlignerModel,
) -> None:
    core = AlignerCore(loaded)
    jobs = [replace(job, language="") for job in make_jobs([2.7, 3.1, 1.9], seed=4)]
    batched = core.align_batch(jobs)
    for job, words in zip(jobs, batched, strict=True):
        expected = reference_alignment(loaded, job.audio_16k, job.text, None)
        assert expected, "the reference times words without a language"
        assert as_timed(words) == expected
    # Chinese characters one by one, other scripts on spaces, punctuation dropped.
    assert [w for w, _, _ in as_timed(batched[1])][:3] == ["今", "天", "天"]
    assert [w for w, _, _ in as_timed(batched[0])][:2] == ["hello", "world"]


def test_batched_requests_equal_reference_alone(loaded: LoadedAlignerModel) -> None:
    # Different lengths (one under the 0.5 s minimum, one over the 8 s attention window) and different word
    # counts, so both the features and the token sequences are padded.
    core = AlignerCore(loaded)
    jobs = make_jobs([0.3, 2.7, 9.5, 1.2, 4.0], seed=1)
    batched = core.align_batch(jobs)
    for job, words in zip(jobs, batched, strict=True):
        assert as_timed(words) == reference_alignment(loaded, job.audio_16k, job.text, job.language), job.job_id


def test_japanese_and_korean_batched_with_others_equal_reference(loaded: LoadedAlignerModel) -> None:
    # Their words come from the optional splitters (the ja and ko extras, installed by `make venv`).
    pytest.importorskip("nagisa")
    pytest.importorskip("soynlp")
    core = AlignerCore(loaded)
    base = make_jobs([2.0, 3.5, 1.0], seed=2)
    texts = [("今日はいい天気ですね。散歩に行きましょう。", "Japanese"), ("안녕하세요 오늘 날씨가 정말 좋네요", "Korean")]
    jobs = [AlignJob(str(i), base[i].audio_16k, text, language) for i, (text, language) in enumerate(texts)]
    jobs.append(base[2])
    for job, words in zip(jobs, core.align_batch(jobs), strict=True):
        expected = reference_alignment(loaded, job.audio_16k, job.text, job.language)
        assert as_timed(words) == expected, job.language
    japanese = [w.text for w in core.align_batch(jobs[:1])[0]]
    # nagisa words, not characters: the reference library's split for Japanese.
    assert "天気" in japanese and len(japanese) < len("今日はいい天気ですね散歩に行きましょう")


def test_text_without_words_and_per_job_errors(loaded: LoadedAlignerModel, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "nagisa", None)
    core = AlignerCore(loaded)
    (good,) = make_jobs([2.0])
    empty = AlignJob("empty", good.audio_16k, " ... !!", "English")
    japanese = AlignJob("ja", good.audio_16k, "テストです", "Japanese")
    outcomes = core.align_batch([good, empty, japanese])
    assert as_timed(outcomes[0]) == reference_alignment(loaded, good.audio_16k, good.text, good.language)
    assert outcomes[1] == ()
    assert isinstance(outcomes[2], FailedPrecondition)


def test_a_row_with_the_wrong_timestamp_count_fails_alone(loaded: LoadedAlignerModel) -> None:
    core = AlignerCore(loaded)
    good, odd = make_jobs([2.0, 3.0])
    prepare = core.prepare

    def one_word_too_many(job: AlignJob) -> Prepared:
        p = prepare(job)
        return replace(p, words=[*p.words, "extra"]) if job is odd else p

    core.prepare = one_word_too_many  # type: ignore[method-assign]
    outcomes = core.align_batch([good, odd])
    assert as_timed(outcomes[0]) == reference_alignment(loaded, good.audio_16k, good.text, good.language)
    assert isinstance(outcomes[1], RuntimeError) and "<timestamp> tokens" in str(outcomes[1])


async def test_batcher_batches_concurrent_requests_invisibly(loaded: LoadedAlignerModel) -> None:
    batcher = AlignBatcher(lambda: AlignerCore(loaded), max_batch_size=8, max_batch_wait_ms=300)
    await batcher.start()
    try:
        jobs = make_jobs([0.4, 1.5, 3.0, 6.0], seed=2)
        outcomes = await asyncio.gather(*(batcher.align(job) for job in jobs))
    finally:
        await batcher.stop()
    assert max(o.batch_size for o in outcomes) > 1
    for job, outcome in zip(jobs, outcomes, strict=True):
        assert as_timed(outcome.words) == reference_alignment(loaded, job.audio_16k, job.text, job.language)
