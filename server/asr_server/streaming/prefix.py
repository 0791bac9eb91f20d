"""The interim-decode prefix: the previous interim's output minus its last few tokens, as the reference does.

The reference (qwen-asr's vLLM streaming) feeds the previous decode's raw output (``language X<asr_text>...``),
minus its last 5 tokens, as the start of the assistant turn, so the next decode only has to confirm or
revise the tail. Dropping whole tokens can split a multi-byte character (a CJK character is often two
byte-level tokens); a prefix that decodes to a trailing U+FFFD drops one more token until it does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

REPLACEMENT_CHAR = "\ufffd"


class TokenDecoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str:
        """The raw text of generated ids (no special tokens; `<asr_text>` is not special and stays)."""
        ...


class HfTokenDecoder:
    """A transformers tokenizer as a TokenDecoder."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._special = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", ()))

    def decode(self, ids: Sequence[int]) -> str:
        kept = [int(i) for i in ids if int(i) not in self._special]
        return str(self._tokenizer.decode(kept, skip_special_tokens=True))


class FakeTokenDecoder:
    """The fake engine's ids are loudness levels, one word "w<level>" each (see engine/fake.py)."""

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(f"w{i}" for i in ids)


def load_hf_token_decoder(model: str) -> HfTokenDecoder:
    """The tokenizer of a model directory or (already downloaded) hub id. Blocking: call it off the loop."""
    from transformers import AutoTokenizer

    from asr_server.models.loading import resolve_model_dir

    return HfTokenDecoder(AutoTokenizer.from_pretrained(str(resolve_model_dir(model))))


def rollback(ids: Sequence[int], drop: int, decoder: TokenDecoder) -> tuple[tuple[int, ...], str]:
    """`ids` less its last `drop` tokens (and more while the text would end in a split character).

    Trailing tokens that decode to nothing (the EOS the engines keep in `token_ids`) are not counted: the
    reference re-encodes the decoded text, so its `drop` tokens are all text.
    """
    end = len(ids)
    while end > 0 and not decoder.decode(ids[end - 1 : end]):
        end -= 1
    keep = end - drop
    while keep > 0:
        text = decoder.decode(ids[:keep])
        if not text.endswith(REPLACEMENT_CHAR):
            return tuple(ids[:keep]), text
        keep -= 1
    return (), ""
