"""A model-free engine core for tests: deterministic text from the audio, optional simulated latency.

It goes through the real runner, so batching across RPCs, cancellation and back-pressure are exercised
exactly as with the model.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import numpy as np

from asr_server.audio.formats import MODEL_SAMPLE_RATE_HZ
from asr_server.engine.core import CoreStats, EngineOutput, StepCounter
from asr_server.engine.types import BatchStats, DecodeRequest, DecodeResult, WaitingQueue, WorkItem

_WORD_S = 0.5


def fake_transcript(request: DecodeRequest) -> tuple[str, tuple[int, ...]]:
    """One word per started half second of audio, named after that half second's loudness.

    Silence gives no words, so chunking at silences does not change the joined text.
    """
    samples = request.audio_16k
    step = int(_WORD_S * MODEL_SAMPLE_RATE_HZ)
    words: list[str] = []
    ids: list[int] = []
    for start in range(0, samples.shape[0], step):
        window = samples[start : start + step]
        rms = float(np.sqrt(np.mean(np.square(window, dtype=np.float64)))) if window.size else 0.0
        if rms < 1e-3:
            continue
        level = min(999, int(round(rms * 1000)))
        words.append(f"w{level}")
        ids.append(level)
    if request.forced_num_tokens is not None:
        ids = (ids * (request.forced_num_tokens // max(1, len(ids)) + 1))[: request.forced_num_tokens]
    limit = request.options.max_new_tokens
    words, ids = words[:limit], ids[:limit]
    prefix = request.prefix_text
    text = " ".join(words)
    if prefix and not text.startswith(prefix):
        text = prefix + text
    return text, tuple(ids)


class FakeEngine:
    """EngineCore without a model. Records each batch's request ids for batching tests. Admits waiting requests by
    priority, then arrival (WaitingQueue), as the model cores do."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        batch_delay_ms: float = 0.0,
        model_id: str = "fake",
        on_step: Callable[[list[DecodeRequest]], None] | None = None,
    ) -> None:
        self.model_id = model_id
        self._max_batch_size = max_batch_size
        self._batch_delay_s = batch_delay_ms / 1000.0
        self._waiting = WaitingQueue()
        self._counter = StepCounter()
        self._on_step = on_step
        self._lock = threading.Lock()
        self.batches: list[list[str]] = []
        self.aborted: list[str] = []
        self.closed = False

    def warmup(self) -> None:
        return None

    def add(self, item: WorkItem) -> None:
        self._waiting.add(item)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self._waiting.remove(request_id)

    def num_waiting(self) -> int:
        return len(self._waiting)

    def num_running(self) -> int:
        return 0

    def oldest_waiting_monotonic_s(self) -> float | None:
        return self._waiting.oldest_monotonic_s()

    def step(self) -> list[EngineOutput]:
        batch = self._waiting.take(self._max_batch_size)
        start_ns = time.time_ns()
        requests = [w.request for w in batch]
        with self._lock:
            self.batches.append([r.request_id for r in requests])
        if self._on_step is not None:
            self._on_step(requests)
        if self._batch_delay_s:
            time.sleep(self._batch_delay_s)
        transcripts = [fake_transcript(r) for r in requests]
        stats = BatchStats(
            batch_size=len(batch),
            audio_s=sum(r.audio_s for r in requests),
            generated_tokens=sum(len(ids) for _, ids in transcripts),
            start_ns=start_ns,
            end_ns=time.time_ns(),
        )
        if batch:
            self._counter.step(len(batch), stats.generated_tokens)
        outputs = []
        for work, (text, ids) in zip(batch, transcripts, strict=True):
            language = work.request.options.language or ("English" if text else "")
            # A made-up probability per token, louder words surer (0.5 to 1): confidence end to end without a model.
            logprobs = tuple(math.log(0.5 + min(level, 999) / 2000) for level in ids)
            # Like a streaming engine, it reports when its tokens appeared: all at once, at the end of the batch.
            result = DecodeResult(
                work.request.request_id,
                text,
                language,
                ids,
                work.enqueued_ns,
                stats,
                stats.end_ns,
                token_logprobs=logprobs,
                text_tokens=(0, len(ids)),
                text_token_pieces=tuple(f" w{level}" if i else f"w{level}" for i, level in enumerate(ids)),
            )
            outputs.append(EngineOutput(work.request.request_id, result=result))
        return outputs

    def stats(self) -> CoreStats:
        return self._counter.snapshot()

    def close(self) -> None:
        self.closed = True
