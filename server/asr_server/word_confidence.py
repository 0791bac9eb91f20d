"""Word confidence: the mean probability of the decoder tokens a word was spelled with.

The aligner's words are pieces of the transcription (punctuation dropped, CJK per character), in order. Each is
found in the raw decoded text of the piece's tokens (their `text_token_pieces` joined), from where the previous word
ended, and gets the mean probability of every token whose characters overlap it. A token that ends inside a
multi-byte character adds no characters of its own: it counts with the token that completes the character. The
parse's repetition fix (a run repeated 20+ times collapses to one copy) only ever drops later copies, so the words
still appear in order in the raw text. A word not found there (a tokenizer that normalises text) gets 0: unknown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from asr_server.results import Word, mean_probability


def word_confidences(words: Sequence[Word], pieces: Sequence[str], probs: Sequence[float]) -> tuple[Word, ...]:
    """`words` with their confidence set; unchanged (confidence 0) when the pieces are not reported."""
    if not words or not pieces or len(pieces) != len(probs):
        return tuple(words)
    # Character spans of the token groups: a group is the tokens up to and including one that adds characters.
    spans: list[tuple[int, int, tuple[float, ...]]] = []
    pending: list[float] = []
    position = 0
    for piece, prob in zip(pieces, probs, strict=True):
        pending.append(prob)
        if piece:
            spans.append((position, position + len(piece), tuple(pending)))
            position += len(piece)
            pending = []
    raw = "".join(pieces)
    out: list[Word] = []
    cursor = 0
    for word in words:
        found = raw.find(word.text, cursor) if word.text else -1
        if found < 0:
            out.append(dataclasses.replace(word, confidence=0.0))
            continue
        end = found + len(word.text)
        cursor = end
        covering = tuple(p for start, stop, group in spans if start < end and stop > found for p in group)
        out.append(dataclasses.replace(word, confidence=mean_probability(covering)))
    return tuple(out)
