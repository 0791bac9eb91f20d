"""Merging per-chunk (or per-segment) results into one transcript.

The reference library joins chunk texts with "" (so "hello" + "world" becomes "helloworld") and merges languages
into "Chinese,English" with consecutive duplicates removed. We keep the language rule and fix the join:

Join rule (at each seam between two non-empty pieces, left L and right R):
1. If L ends or R starts with whitespace: join as is (never double a space).
2. If the last character of L or the first of R belongs to a script written without spaces (Han, Hiragana,
   Katakana, Bopomofo, CJK punctuation and full-width forms, Thai, Lao, Khmer, Myanmar): no space.
3. If R starts with closing punctuation (. , ! ? ; : ) ] } and the like) or L ends with opening punctuation
   (( [ { and the like): no space.
4. If neither seam character is a letter (digits, symbols: "100" + "200"), the languages decide: no space when
   either piece's language is written without spaces (Chinese, Cantonese, Japanese, Thai), else one space.
5. Otherwise one space ("hello" + "world" -> "hello world"; Korean is space-delimited, so Hangul gets a space).
"""

from __future__ import annotations

import bisect
import unicodedata
from collections.abc import Sequence

# Code point ranges (inclusive) of scripts written without spaces between words.
_NO_SPACE_RANGES: tuple[tuple[int, int], ...] = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x2E80, 0x2FDF),  # CJK radicals, Kangxi radicals
    (0x2FF0, 0x303F),  # ideographic description, CJK symbols and punctuation
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x3190, 0x31FF),  # Kanbun, Bopomofo extended, CJK strokes, Katakana phonetic extensions
    (0x3200, 0x33FF),  # enclosed CJK, CJK compatibility
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFE30, 0xFE4F),  # CJK compatibility forms
    (0xFF00, 0xFFEF),  # half-width and full-width forms
    (0x20000, 0x3FFFF),  # CJK extensions B and later
)
_RANGE_STARTS = [start for start, _ in _NO_SPACE_RANGES]

_NO_SPACE_LANGUAGES = frozenset({"chinese", "cantonese", "japanese", "thai"})
# Unicode categories: Pe/Pf close brackets and quotes; Ps/Pi open them.
_CLOSING_CATEGORIES = frozenset({"Pe", "Pf"})
_OPENING_CATEGORIES = frozenset({"Ps", "Pi"})
_CLOSING_ASCII = frozenset(".,!?;:%")


def merge_languages(langs: Sequence[str]) -> str:
    """["Chinese", "English", "English", "", "Chinese,Chinese"] -> "Chinese,English,Chinese".

    Inputs may already be merged ("Chinese,English"): they are split on ',' first. Empty names are skipped and
    consecutive duplicates removed; order is kept.
    """
    merged: list[str] = []
    for entry in langs:
        for name in entry.split(","):
            name = name.strip()
            if name and (not merged or merged[-1] != name):
                merged.append(name)
    return ",".join(merged)


def join_texts(texts: Sequence[str], languages: Sequence[str]) -> str:
    """Join chunk texts in order by the module's join rule. `languages[i]` is the language of `texts[i]`
    (may be empty or already merged, e.g. "Chinese,English")."""
    if len(texts) != len(languages):
        raise ValueError(f"join_texts needs one language per text: {len(texts)} texts, {len(languages)} languages")
    out: list[str] = []
    previous_text = ""
    previous_language = ""
    for text, language in zip(texts, languages, strict=True):
        if not text:
            continue
        if previous_text and _needs_space(previous_text, text, previous_language, language):
            out.append(" ")
        out.append(text)
        previous_text, previous_language = text, language
    return "".join(out)


def _needs_space(left: str, right: str, left_language: str, right_language: str) -> bool:
    last, first = left[-1], right[0]
    if last.isspace() or first.isspace():
        return False
    if _is_no_space_script(last) or _is_no_space_script(first):
        return False
    if _is_closing(first) or unicodedata.category(last) in _OPENING_CATEGORIES:
        return False
    if not last.isalpha() and not first.isalpha():
        return not (_written_without_spaces(left_language) or _written_without_spaces(right_language))
    return True


def _is_no_space_script(char: str) -> bool:
    code = ord(char)
    index = bisect.bisect_right(_RANGE_STARTS, code) - 1
    return index >= 0 and code <= _NO_SPACE_RANGES[index][1]


def _is_closing(char: str) -> bool:
    return char in _CLOSING_ASCII or unicodedata.category(char) in _CLOSING_CATEGORIES


def _written_without_spaces(language: str) -> bool:
    return any(name.strip().lower() in _NO_SPACE_LANGUAGES for name in language.split(","))
