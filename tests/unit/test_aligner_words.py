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
