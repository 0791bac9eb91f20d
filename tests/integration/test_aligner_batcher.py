"""The aligner batcher's failure handling, with a model-free core."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from asr_server.aligner.batcher import AlignBatcher
from asr_server.aligner.core import AlignJob
from asr_server.results import Word


class ScriptedCore:
    """Answers each batch with what `answers` holds next (a list of outcomes per job)."""

    def __init__(self, answers: list[list[tuple[Word, ...] | Exception]]) -> None:
        self._answers = answers

    def warmup(self) -> None:
        return None

    def align_batch(self, jobs: list[AlignJob]) -> list[tuple[Word, ...] | Exception]:
        return self._answers.pop(0)


def job(name: str) -> AlignJob:
    return AlignJob(name, np.zeros(16_000, dtype=np.float32), "hello", "English")


async def test_a_core_that_answers_too_few_jobs_fails_that_batch_and_the_thread_goes_on() -> None:
    word = (Word("hello", 0, 500),)
    batcher = AlignBatcher(lambda: ScriptedCore([[], [word]]), max_batch_size=1, max_batch_wait_ms=0)  # type: ignore[arg-type,return-value]
    await batcher.start()
    with pytest.raises(RuntimeError, match="answered 0 of 1"):
        await asyncio.wait_for(batcher.align(job("a")), timeout=5)
    outcome = await asyncio.wait_for(batcher.align(job("b")), timeout=5)
    await batcher.stop()
    assert outcome.words == word
