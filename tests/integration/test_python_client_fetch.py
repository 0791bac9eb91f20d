"""The Python client fetching audio from a URL, over a real socket.

Every other input form: tests/unit/test_python_client_audio.py.
"""

from __future__ import annotations

import pytest

from asr_client.audio import load_audio


def test_an_unreachable_url_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"cannot fetch audio from http://127\.0\.0\.1:9/x\.wav"):
        load_audio("http://127.0.0.1:9/x.wav", fetch_timeout_s=2)

