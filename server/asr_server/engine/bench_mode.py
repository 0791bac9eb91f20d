"""Benchmark mode: make every request generate a fixed number of tokens per audio second.

Random-weight models never emit a sensible EOS, so without this a benchmark measures whatever length the noise
happens to give. With it, a request of `audio_s` seconds generates round(rate * audio_s) + LANGUAGE_PREFIX_TOKENS
tokens (EOS suppressed), about what real speech gives: 4 tokens/s plus "language English<asr_text>". 120 s at
4/s gives 486 tokens, the length the speed anchors in the facts note use. Off unless the flag asks for it.

A request with an assistant prefix (a live interim continues from the previous one's text minus its last tokens)
generates that many fewer, at least one: a real model given the prefix writes only the rest of the transcript, so
counting the prefix again would make every interim decode the whole open utterance's text (work growing with the
utterance that no real stream does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from asr_server.engine.core import EngineCore, EngineOutput
from asr_server.engine.types import WorkItem

LANGUAGE_PREFIX_TOKENS = 6


def forced_tokens(audio_s: float, rate: float, prefix_tokens: int = 0) -> int:
    return max(1, int(round(rate * audio_s)) + LANGUAGE_PREFIX_TOKENS - prefix_tokens)


class ForcedTokensCore:
    """Wraps any EngineCore, setting DecodeRequest.forced_num_tokens on the way in; `count_tokens` gives the
    length of a request's assistant prefix in tokens (the model's tokenizer; None: prefixes are not counted)."""

    def __init__(
        self, inner: EngineCore, tokens_per_audio_s: float, count_tokens: Callable[[str], int] | None = None
    ) -> None:
        self._inner = inner
        self._rate = tokens_per_audio_s
        self._count_tokens = count_tokens
        self.model_id = inner.model_id

    def add(self, item: WorkItem) -> None:
        request = item.request
        prefix = self._count_tokens(request.prefix_text) if request.prefix_text and self._count_tokens else 0
        request = dataclasses.replace(request, forced_num_tokens=forced_tokens(request.audio_s, self._rate, prefix))
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
