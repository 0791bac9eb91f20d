"""Word splitting for the aligner and the repair of its raw timestamps.

Splitting is transformers' own (`Qwen3ASRProcessor.split_words_for_alignment`, a port of the original library):
CJK characters one by one, other scripts on whitespace with punctuation dropped, Japanese through nagisa and Korean
through soynlp. Those two are optional extras of this package; a missing one is a FailedPrecondition that names
the pip extra instead of transformers' ImportError.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from asr_server.errors import FailedPrecondition

# Language -> (module the splitter imports, extra of this package that installs it).
_SPLITTER_EXTRAS: dict[str, tuple[str, str]] = {
    "Japanese": ("nagisa", "ja"),
    "Korean": ("soynlp", "ko"),
}
PACKAGE_NAME = "qwen-asr-server"


def check_splitter(language: str) -> None:
    """Raises FailedPrecondition when `language` needs an optional word splitter that is not installed."""
    needed = _SPLITTER_EXTRAS.get(language)
    if needed is None:
        return
    module, extra = needed
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise FailedPrecondition(missing_extra_message(language, module, extra)) from exc


def missing_extra_message(language: str, module: str, extra: str) -> str:
    return (
        f"word timestamps for {language} need the {module!r} word splitter, which is not installed where the "
        f"aligner runs; install it with: pip install '{PACKAGE_NAME}[{extra}]' (or pip install {module})"
    )


def split_words(processor: Any, text: str, language: str) -> list[str]:
    """The words the aligner times for `text`, as transformers' reference path splits them."""
    check_splitter(language)
    try:
        words = processor.split_words_for_alignment(text, language)
    except ImportError as exc:  # a splitter that imports but whose own dependencies are broken
        module, extra = _SPLITTER_EXTRAS.get(language, ("?", "?"))
        raise FailedPrecondition(f"{missing_extra_message(language, module, extra)} ({exc})") from exc
    return [str(w) for w in words]


def fix_timestamps(raw: Sequence[float] | npt.NDArray[np.floating[Any]]) -> list[int]:
    """Makes the aligner's raw times (ms) non-decreasing, exactly as the reference does.

    Same result as transformers' `_fix_timestamps` (itself a port of the original library): the longest
    non-decreasing subsequence is kept (first-found on ties), outlier runs of at most 2 snap to the nearer kept
    neighbour, longer runs are interpolated between their neighbours; values are truncated to int. The reference's
    O(n^2) dynamic programme runs in pure Python (about 1 s for a 180 s chunk of fast speech); here its inner loop is
    vectorised, which keeps the identical tie-breaking.
    """
    data = np.asarray(raw, dtype=np.float64)
    n = int(data.shape[0])
    if n == 0:
        return []
    dp = np.ones(n, dtype=np.int64)
    parent = np.full(n, -1, dtype=np.int64)
    for current in range(1, n):
        candidates = np.where(data[:current] <= data[current], dp[:current], 0)
        best = int(np.argmax(candidates))  # first index of the maximum, like the reference's strict ">"
        if candidates[best] + 1 > dp[current]:
            dp[current] = candidates[best] + 1
            parent[current] = best
    is_normal = [False] * n
    idx = int(np.argmax(dp))
    while idx != -1:
        is_normal[idx] = True
        idx = int(parent[idx])

    values: list[float] = data.tolist()
    result = list(values)
    start = 0
    while start < n:
        if is_normal[start]:
            start += 1
            continue
        end = start
        while end < n and not is_normal[end]:
            end += 1
        left = next((result[i] for i in range(start - 1, -1, -1) if is_normal[i]), None)
        right = next((result[i] for i in range(end, n) if is_normal[i]), None)
        count = end - start
        for pos in range(start, end):
            if count <= 2:
                if left is None:
                    value = right
                elif right is None:
                    value = left
                else:
                    value = left if (pos - (start - 1)) <= (end - pos) else right
            elif left is not None and right is not None:
                value = left + (right - left) / (count + 1) * (pos - start + 1)
            else:
                value = left if left is not None else right
            if value is not None:
                result[pos] = value
        start = end
    return [int(v) for v in result]
