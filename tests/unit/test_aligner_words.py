"""Word splitting and timestamp repair of the forced aligner (no model needed).

Splitting with the tiny checkpoint's tokenizer, and the repair against transformers' own:
tests/integration/test_aligner_words_transformers.py.
"""

from __future__ import annotations

import numpy as np

from asr_server.aligner.words import check_splitter, fix_timestamps


def test_other_languages_need_no_extra() -> None:
    for language in ("English", "Chinese", "Cantonese", "French", "German", "Russian"):
        check_splitter(language)


def test_fix_timestamps_is_monotonic() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        fixed = fix_timestamps(rng.integers(0, 100, int(rng.integers(1, 40))) * 80.0)
        assert all(a <= b for a, b in zip(fixed, fixed[1:], strict=False))
    assert fix_timestamps([]) == []


def test_the_align_word_count_equals_the_reference_splitter() -> None:
    from transformers.models.qwen3_asr.processing_qwen3_asr import Qwen3ASRProcessor

    from asr_server.alignment import max_words

    texts = [
        "hello world, this is a test",
        "It's 3.5 km.",
        "今天天气很好，我们去公园散步吧。",
        "Mixed: 我喜欢 Python 和 machine learning",
        "?! ... --",
        "  spaced   out\ttabs\nnewlines ",
    ]
    for text in texts:
        # split_words_for_alignment uses no state of the processor for these languages.
        reference = Qwen3ASRProcessor.split_words_for_alignment(None, text, "English")  # type: ignore[arg-type]
        assert max_words(text, "English") == len(reference), text
    assert max_words("こんにちは 世界", "Japanese") == 7  # an upper bound: every kept character
