"""Benchmark mode: make every request generate a fixed number of tokens per audio second.

Random-weight models never emit a sensible EOS, so without this a benchmark measures whatever length the noise
happens to give. With it, a request of `audio_s` seconds generates round(rate * audio_s) + LANGUAGE_PREFIX_TOKENS
tokens (EOS suppressed), about what real speech gives: 4 tokens/s plus "language English<asr_text>". 120 s at
4/s gives 486 tokens, the length the speed anchors in the facts note use. Off unless the flag asks for it.
"""

from __future__ import annotations

import dataclasses

from asr_server.engine.core import EngineCore, EngineOutput
from asr_server.engine.types import WorkItem

LANGUAGE_PREFIX_TOKENS = 6


def forced_tokens(audio_s: float, rate: float) -> int:
    return int(round(rate * audio_s)) + LANGUAGE_PREFIX_TOKENS


class ForcedTokensCore:
    """Wraps any EngineCore, setting DecodeRequest.forced_num_tokens on the way in."""

    def __init__(self, inner: EngineCore, tokens_per_audio_s: float) -> None:
        self._inner = inner
        self._rate = tokens_per_audio_s
        self.model_id = inner.model_id

    def add(self, item: WorkItem) -> None:
        request = dataclasses.replace(item.request, forced_num_tokens=forced_tokens(item.request.audio_s, self._rate))
        self._inner.add(dataclasses.replace(item, request=request))

    def warmup(self) -> None:
        self._inner.warmup()

    def abort(self, request_id: str) -> None:
        self._inner.abort(request_id)

    def num_waiting(self) -> int:
        return self._inner.num_waiting()

    def num_running(self) -> int:
        return self._inner.num_running()

    def oldest_waiting_monotonic_s(self) -> float | None:
        return self._inner.oldest_waiting_monotonic_s()

    def step(self) -> list[EngineOutput]:
        return self._inner.step()

    def close(self) -> None:
        self._inner.close()
