"""The forced aligner's word splitting and timestamp repair against transformers: the tokenizer of the tiny aligner
checkpoint, and transformers' own timestamp repair as the reference (importing it costs seconds).

The rest of both is tested without transformers in tests/unit/test_aligner_words.py.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

from asr_server.aligner.words import check_splitter, fix_timestamps, split_words
from asr_server.errors import FailedPrecondition
from asr_server.models.tiny_checkpoint import TinyCheckpoints


@pytest.fixture(scope="module")
def processor(tiny_checkpoints: TinyCheckpoints) -> Any:
    from transformers import Qwen3ASRProcessor

    return Qwen3ASRProcessor.from_pretrained(str(tiny_checkpoints.aligner_hf))


def test_cjk_per_character_and_spaces_elsewhere(processor: Any) -> None:
    assert split_words(processor, "今天天气很好，我们", "Chinese") == ["今", "天", "天", "气", "很", "好", "我", "们"]
    assert split_words(processor, "Hello, world! It's 3.5 km.", "English") == ["Hello", "world", "It's", "35", "km"]
    assert split_words(processor, "Mixed 中文 text", "English") == ["Mixed", "中", "文", "text"]
    assert split_words(processor, " ... !! ", "English") == []


@pytest.mark.parametrize(("language", "module", "extra"), [("Japanese", "nagisa", "ja"), ("Korean", "soynlp", "ko")])
def test_missing_splitter_extra_is_a_clear_failed_precondition(
    monkeypatch: pytest.MonkeyPatch, processor: Any, language: str, module: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if not installed
    with pytest.raises(FailedPrecondition) as info:
        split_words(processor, "テスト", language)
    message = str(info.value)
    assert f"qwen-asr-server[{extra}]" in message and module in message and language in message
    with pytest.raises(FailedPrecondition):
        check_splitter(language)


def test_fix_timestamps_equals_transformers_reference() -> None:
    reference = pytest.importorskip("transformers.models.qwen3_asr.processing_qwen3_asr")._fix_timestamps
    rng = np.random.default_rng(0)
    for trial in range(600):
        n = int(rng.integers(1, 50))
        if trial % 3 == 0:
            raw = rng.integers(0, 30, n) * 80.0
        elif trial % 3 == 1:
            raw = np.sort(rng.integers(0, 400, n)) * 80.0
            k = max(1, n // 4)
            raw[rng.integers(0, n, k)] = rng.integers(0, 400, k) * 80.0
        else:
            raw = rng.integers(0, 4, n) * 80.0
        raw = raw.astype(np.float32)
        assert fix_timestamps(raw) == reference(raw), raw

