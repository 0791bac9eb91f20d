"""The interim-decode prefix with the tokenizer the servicer loads from the tiny checkpoint's directory.

Everything else about `rollback` (on the same tokenizer, built without a checkpoint) is tested in
tests/unit/test_streaming_prefix.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from asr_server.models.tiny_checkpoint import TinyCheckpoints, build_tokenizer
from asr_server.streaming.prefix import load_hf_token_decoder, rollback
from tests.unit.test_streaming_prefix import RAW_ZH, encode


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


def test_the_checkpoints_saved_tokenizer_behaves_the_same(tiny_checkpoints: TinyCheckpoints, tokenizer: Any) -> None:
    # What the servicer loads (load_hf_token_decoder on the model directory) splits and rolls back alike.
    loaded = load_hf_token_decoder(str(tiny_checkpoints.asr_hf))
    ids = encode(tokenizer, RAW_ZH)
    assert loaded.decode(ids) == RAW_ZH
    assert rollback(ids, 1, loaded) == (tuple(ids[:-3]), "language Chinese<asr_text>你好世界")

