"""The interim-decode prefix (`streaming/prefix.py` `rollback`): the previous interim's tokens minus the last few.

The reference (qwen-asr `streaming_transcribe`, vLLM backend) builds each decode's prefix as
`decode(encode(previous raw output)[:max(1, n - unfixed_token_num)])` with `unfixed_token_num=5`, and uses no
prefix for the first `unfixed_chunk_num=2` chunks. Here the counterparts are `StreamingOptions.rollback_tokens`
and `StreamingOptions.unprefixed_interims`. Differences from the reference, on purpose: the prefix never ends in
a split multi-byte character (the reference would put U+FFFD into the prompt), and a history of `drop` tokens or
fewer gives no prefix at all (the reference keeps its first token, typically just "language").

The multi-byte cases use the tiny checkpoint's real byte-level BPE (models/tiny_checkpoint.py), in which
"龘" is not in the corpus and so is three byte tokens, and "😀" four.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from asr_server.models.tiny_checkpoint import build_tokenizer
from asr_server.streaming.prefix import (
    REPLACEMENT_CHAR,
    FakeTokenDecoder,
    HfTokenDecoder,
    rollback,
)
from asr_server.streaming.session import StreamingOptions
from asr_server.transcription import TranscribeOptions

RAW_ZH = "language Chinese<asr_text>你好世界龘"
RAW_EMOJI = "language English<asr_text>hello world 😀"
RAW_EN = "language English<asr_text>the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    # The same tokenizer the tiny checkpoints save (built in about a second; the checkpoints take longer).
    return build_tokenizer()


@pytest.fixture(scope="module")
def decoder(tokenizer: Any) -> HfTokenDecoder:
    return HfTokenDecoder(tokenizer)


def encode(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def split_char_tail(decoder: HfTokenDecoder, ids: Sequence[int]) -> int:
    """How many trailing tokens of `ids` are the leading bytes of a character its last token would complete."""
    count = 0
    while decoder.decode(ids[: len(ids) - 1 - count]).endswith(REPLACEMENT_CHAR):
        count += 1
    return count


def test_defaults_are_the_references() -> None:
    options = StreamingOptions(transcribe=TranscribeOptions(language=None, context="", max_new_tokens=256))
    assert options.rollback_tokens == 5  # qwen-asr init_streaming_state(unfixed_token_num=5)
    assert options.unprefixed_interims == 2  # qwen-asr init_streaming_state(unfixed_chunk_num=2)


def test_prefix_is_the_history_less_its_last_drop_tokens(tokenizer: Any, decoder: HfTokenDecoder) -> None:
    ids = encode(tokenizer, RAW_EN)
    assert len(ids) > 8
    prefix_ids, prefix_text = rollback(ids, 5, decoder)
    assert prefix_ids == tuple(ids[:-5])
    assert prefix_text == decoder.decode(ids[:-5])
    assert RAW_EN.startswith(prefix_text) and prefix_text.startswith("language English<asr_text>")
    for drop in range(len(ids)):
        assert rollback(ids, drop, decoder)[0] == tuple(ids[: len(ids) - drop]), drop


def test_the_fake_decoder_drops_whole_words() -> None:
    ids = tuple(range(10, 20))
    assert rollback(ids, 5, FakeTokenDecoder()) == ((10, 11, 12, 13, 14), "w10 w11 w12 w13 w14")
    assert rollback(ids, 0, FakeTokenDecoder()) == (ids, FakeTokenDecoder().decode(ids))


def test_the_tokenizer_splits_these_characters_across_tokens(tokenizer: Any, decoder: HfTokenDecoder) -> None:
    # The premise of the multi-byte tests: cutting inside the last character decodes to a trailing U+FFFD.
    zh = encode(tokenizer, RAW_ZH)
    assert decoder.decode(zh) == RAW_ZH
    assert split_char_tail(decoder, zh) == 2  # "龘" is three tokens
    emoji = encode(tokenizer, RAW_EMOJI)
    assert decoder.decode(emoji) == RAW_EMOJI
    assert split_char_tail(decoder, emoji) == 3  # "😀" is four


@pytest.mark.parametrize("drop", [1, 2])
def test_a_cut_inside_a_cjk_character_steps_back_to_before_it(
    tokenizer: Any, decoder: HfTokenDecoder, drop: int
) -> None:
    ids = encode(tokenizer, RAW_ZH)
    # Dropping 1 or 2 tokens leaves 2 or 1 of the three bytes of "龘": both go too.
    prefix_ids, prefix_text = rollback(ids, drop, decoder)
    assert prefix_ids == tuple(ids[:-3])
    assert prefix_text == "language Chinese<asr_text>你好世界"
    assert not prefix_text.endswith(REPLACEMENT_CHAR)


def test_a_cut_inside_a_character_followed_by_the_rollback_window(tokenizer: Any, decoder: HfTokenDecoder) -> None:
    # The usual shape: the character sits just before the last `drop` tokens, which cut it after its first byte.
    head = encode(tokenizer, "language Chinese<asr_text>你好龘")
    tail = encode(tokenizer, "abcdefghij")
    ids = head + tail
    drop = len(tail) + 2  # keeps "...你好" plus the first byte token of "龘"
    assert decoder.decode(ids[: len(ids) - drop]).endswith(REPLACEMENT_CHAR)
    prefix_ids, prefix_text = rollback(ids, drop, decoder)
    assert prefix_ids == tuple(head[:-3])
    assert prefix_text == "language Chinese<asr_text>你好"


@pytest.mark.parametrize("raw", [RAW_ZH, RAW_EMOJI, RAW_EN, "language Japanese<asr_text>東京で龘😀会いましょう龘"])
def test_every_cut_gives_the_longest_prefix_that_ends_in_a_whole_character(
    tokenizer: Any, decoder: HfTokenDecoder, raw: str
) -> None:
    ids = encode(tokenizer, raw)
    for drop in range(len(ids) + 3):
        prefix_ids, prefix_text = rollback(ids, drop, decoder)
        keep = len(prefix_ids)
        assert prefix_ids == tuple(ids[:keep]), drop
        assert keep <= max(0, len(ids) - drop), drop
        assert prefix_text == decoder.decode(prefix_ids), drop
        assert not prefix_text.endswith(REPLACEMENT_CHAR), drop
        assert raw.startswith(prefix_text), drop
        # Longest: every longer cut within the allowed length ends in a split character.
        for longer in range(keep + 1, len(ids) - drop + 1):
            assert decoder.decode(ids[:longer]).endswith(REPLACEMENT_CHAR), (drop, longer)


def test_empty_and_short_histories_give_no_prefix(tokenizer: Any, decoder: HfTokenDecoder) -> None:
    assert rollback((), 5, decoder) == ((), "")
    assert rollback((), 0, decoder) == ((), "")
    ids = encode(tokenizer, RAW_EN)
    for n in range(6):
        assert rollback(ids[:n], 5, decoder) == ((), ""), n
    assert rollback(ids[:6], 5, decoder) == ((ids[0],), "language")
    assert rollback(tuple(range(1, 6)), 5, FakeTokenDecoder()) == ((), "")
    assert rollback(tuple(range(1, 4)), 5, FakeTokenDecoder()) == ((), "")


def test_a_history_that_is_only_a_split_character_gives_no_prefix(tokenizer: Any, decoder: HfTokenDecoder) -> None:
    ids = encode(tokenizer, "龘") + encode(tokenizer, "ab")
    assert len(ids) == 4
    # Dropping 1 or 2 leaves only bytes of "龘" without its last: stepping back empties the prefix.
    assert rollback(ids, 2, decoder) == ((), "")
    assert rollback(ids, 3, decoder) == ((), "")
    assert rollback(ids, 1, decoder) == (tuple(ids[:3]), "龘")


def test_a_trailing_eos_is_not_counted_as_one_of_the_dropped_tokens(tokenizer: Any, decoder: HfTokenDecoder) -> None:
    # Both engines keep the EOS in DecodeResult.token_ids, so an interim's ids usually end with it. The reference
    # re-encodes the decoded text (no EOS), so its 5 dropped tokens are all text: the same 5 must go here.
    text_ids = encode(tokenizer, RAW_EN)
    for eos in ("<|im_end|>", "<|endoftext|>"):
        eos_id = int(tokenizer.convert_tokens_to_ids(eos))
        for ids in (text_ids + [eos_id], text_ids + [eos_id, eos_id]):
            assert rollback(ids, 5, decoder) == rollback(text_ids, 5, decoder), eos
    # A history that is only special tokens has nothing to keep.
    assert rollback([int(tokenizer.convert_tokens_to_ids("<|im_end|>"))], 0, decoder) == ((), "")
