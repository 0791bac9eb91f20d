"""The continuous engine's output step: sampled tokens into each request's output, finished ones into results.

A request ends at its token budget or (unless its length is forced) at an EOS token; its tokens are then
detokenized and parsed as the reference path parses them (generate_core.parse_transcription). Tokens reach the
host one step late, so a request ended by one step still has a token in the next: `finished` makes it ignored.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from asr_server.engine.core import EngineOutput
from asr_server.engine.generate_core import asr_text_token_id, parse_transcription, text_pieces, text_token_span
from asr_server.engine.types import BatchStats, DecodeResult, WorkItem


@dataclass
class RequestOutput:
    """What the host knows of one admitted or waiting request's output."""

    item: WorkItem
    budget: int
    suppress_eos: bool
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    start_ns: int = 0
    first_token_ns: int = 0
    logprobs: list[float] = field(default_factory=list)  # entry for entry with `tokens`
    draft_accepted: int = 0  # draft tokens its prefill verified and kept (OutputStep.verify)

    @property
    def request_id(self) -> str:
        return self.item.request.request_id


class SampledValues(list[int]):
    """The host's tokens of one launched unit (a list of ints, as `OutputStep.append` reads them) and, entry for
    entry, their log-probabilities (`logprobs`, from the same device step): one object, so the engine core hands
    both on without knowing of the second."""

    def __init__(self, tokens: list[int], logprobs: list[float]) -> None:
        super().__init__(tokens)
        self.logprobs = logprobs


class OutputStep:
    def __init__(self, processor: Any, eos_ids: Iterable[int]) -> None:
        self._processor = processor
        self._eos_ids = frozenset(eos_ids)
        self._asr_text_id = asr_text_token_id(processor)
        # Time to first token (ms, from arrival to the host seeing it) of recent requests, for benchmarks.
        self.ttft_ms: deque[float] = deque(maxlen=100_000)

    def append(self, owners: Iterable[tuple[int, RequestOutput]], values: list[int]) -> list[RequestOutput]:
        """Appends each owner's token (values[index]); returns the requests this ends (not yet marked finished)."""
        done: list[RequestOutput] = []
        for index, req in owners:
            if not req.finished and self._push(req, values, index):
                done.append(req)
        return done

    def verify(
        self, drafted: Iterable[tuple[int, RequestOutput, tuple[int, ...]]], values: list[int]
    ) -> list[RequestOutput]:
        """Each drafted request's prefill tokens: g = values[index : index + k + 1], the greedy token after its
        prompt and after each of its k draft tokens d. The draft's longest prefix with g_i == d_i (a tokens) is
        what greedy decoding writes, then g_a; so g_0..g_a are appended (the model runner found the same a on the
        device and decodes on from g_a). Returns the requests this ends."""
        done: list[RequestOutput] = []
        for index, req, draft in drafted:
            if req.finished:
                continue
            accepted = 0
            while accepted < len(draft) and int(values[index + accepted]) == draft[accepted]:
                accepted += 1
            req.draft_accepted = accepted
            for i in range(index, index + accepted + 1):
                if self._push(req, values, i):
                    done.append(req)
                    break
        return done

    def _push(self, req: RequestOutput, values: list[int], index: int) -> bool:
        """Appends values[index] (and its log-probability) to req; whether that ends it."""
        token = int(values[index])
        if isinstance(values, SampledValues):
            req.logprobs.append(float(values.logprobs[index]))
        if not req.tokens:
            req.first_token_ns = time.time_ns()
            self.ttft_ms.append((req.first_token_ns - req.item.enqueued_ns) / 1e6)
        req.tokens.append(token)
        return len(req.tokens) >= req.budget or (not req.suppress_eos and token in self._eos_ids)

    def result(self, req: RequestOutput, batch_size: int, end_ns: int) -> EngineOutput:
        request = req.item.request
        try:
            text, language = parse_transcription(self._processor, request, req.tokens)
        except Exception as exc:  # noqa: BLE001 - a decoding failure is this request's alone
            return EngineOutput(req.request_id, error=RuntimeError(f"decoding the output failed: {exc}"))
        stats = BatchStats(
            batch_size=batch_size,
            audio_s=request.audio_s,
            generated_tokens=len(req.tokens),
            start_ns=req.start_ns,
            end_ns=end_ns,
        )
        logprobs = tuple(req.logprobs) if len(req.logprobs) == len(req.tokens) else ()
        span = text_token_span(req.tokens, self._asr_text_id, self._eos_ids) if logprobs else (0, 0)
        result = DecodeResult(
            req.request_id,
            text,
            language,
            tuple(req.tokens),
            req.item.enqueued_ns,
            stats,
            req.first_token_ns,
            token_logprobs=logprobs,
            text_tokens=span,
            text_token_pieces=text_pieces(self._processor, req.tokens[span[0] : span[1]]),
        )
        return EngineOutput(req.request_id, result=result)
