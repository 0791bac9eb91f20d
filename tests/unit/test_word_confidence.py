"""Word confidence from the tokens a word was spelled with (word_confidence.py)."""

from __future__ import annotations

import pytest

from asr_server.results import Word
from asr_server.word_confidence import word_confidences


def words(*texts: str) -> list[Word]:
    return [Word(t, 80 * i, 80 * i + 40) for i, t in enumerate(texts)]


def confidences(result: tuple[Word, ...]) -> list[float]:
    return [w.confidence for w in result]


def test_a_word_gets_the_mean_of_the_tokens_it_spans_and_punctuation_tokens_count_nowhere() -> None:
    got = word_confidences(words("hello", "world"), ["hello", " wor", "ld", ","], [0.9, 0.5, 0.7, 0.2])
    assert confidences(got) == pytest.approx([0.9, 0.6])
    assert [(w.text, w.start_ms, w.end_ms) for w in got] == [("hello", 0, 40), ("world", 80, 120)]


def test_a_token_ending_inside_a_character_counts_with_the_token_that_completes_it() -> None:
    # "你" is three UTF-8 bytes split over two tokens: the first adds no characters.
    got = word_confidences(words("你", "好"), ["", "你", "好"], [0.4, 0.6, 0.8])
    assert confidences(got) == pytest.approx([0.5, 0.8])


def test_a_token_spanning_two_words_counts_for_both() -> None:
    got = word_confidences(words("今", "天"), ["今天"], [0.7])
    assert confidences(got) == pytest.approx([0.7, 0.7])


def test_words_are_found_in_order_and_one_not_found_is_unknown_without_losing_the_rest() -> None:
    pieces = ["go", " go", " stop", " go"]
    got = word_confidences(words("go", "stop", "missing", "go"), pieces, [0.1, 0.2, 0.3, 0.4])
    # The second "go" is the one after "stop", not the first token again.
    assert confidences(got) == pytest.approx([0.1, 0.3, 0.0, 0.4])


def test_without_pieces_the_words_stay_unknown() -> None:
    given = words("a", "b")
    assert word_confidences(given, [], []) == tuple(given)
    assert word_confidences(given, ["a"], [0.5, 0.5]) == tuple(given)  # mismatched lengths: not trusted


def test_shifting_a_word_keeps_its_confidence() -> None:
    assert Word("x", 0, 10, 0.25).shifted(1000) == Word("x", 1000, 1010, 0.25)
