"""What flows between the async front and the engine thread. Plain frozen values; no torch, no grpc."""

from __future__ import annotations

import bisect
import enum
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from asr_server.audio.formats import MODEL_SAMPLE_RATE_HZ


@dataclass(frozen=True)
class DecodeOptions:
    # Canonical language name to force, or None to let the model detect it.
    language: str | None
    # System-prompt text; "" for none.
    context: str
    max_new_tokens: int


class DecodePriority(enum.IntEnum):
    """Which waiting request an engine admits first: the lowest value, then the earliest arrival."""

    # A live stream's final: its caller has been waiting since the end of speech.
    FINAL = 0
    # Recorded audio (Transcribe, TranscribeStream).
    NORMAL = 1
    # A live stream's interim: best effort, superseded by the stream's next one.
    INTERIM = 2


@dataclass(frozen=True, eq=False)
class DecodeRequest:
    """One piece of audio (a chunk, an utterance) to decode on its own."""

    request_id: str
    audio_16k: npt.NDArray[np.float32]
    options: DecodeOptions
    # Text the assistant turn is continued from (streaming interim decodes); "" for none.
    prefix_text: str = ""
    # Benchmarks only: generate exactly this many tokens, ignoring EOS (random weights never stop sensibly).
    forced_num_tokens: int | None = None
    priority: DecodePriority = DecodePriority.NORMAL
    # A live stream utterance's key, the same on its interims and its final: an engine may keep that
    # utterance's state between them (the continuous engine: its completed encoder windows). None: none kept.
    stream_key: str | None = None
    # Tokens the output is expected to start with (a live final: its utterance's last interim's output). An engine
    # may verify them in one forward pass and keep the longest prefix greedy decoding agrees with (greedy
    # speculative verification): the result is what decoding without them gives. () for none.
    draft_token_ids: tuple[int, ...] = ()

    @property
    def audio_s(self) -> float:
        return float(self.audio_16k.shape[0]) / MODEL_SAMPLE_RATE_HZ


@dataclass(frozen=True)
class BatchStats:
    """What the batch that carried a request looked like; for timings and trace spans."""

    batch_size: int
    audio_s: float
    generated_tokens: int
    start_ns: int  # time.time_ns() when the batch began
    end_ns: int


@dataclass(frozen=True)
class DecodeResult:
    request_id: str
    # The transcription as transformers' processor.decode(..., return_format="parsed") gives it.
    text: str
    # The detected language, or the forced one; "" when the model found no speech ("language None").
    language: str
    token_ids: tuple[int, ...]
    enqueued_ns: int
    batch: BatchStats
    # When the engine's host side first saw a generated token of this request (time.time_ns); 0 when the engine
    # does not report it (padded generate returns all tokens at once).
    first_token_ns: int = 0
    # Entry for entry with token_ids: each token's natural-log probability under the model (log-softmax of its
    # logits at the chosen token); () when the engine does not report them.
    token_logprobs: tuple[float, ...] = ()
    # [start, end) of the tokens in token_ids that spell `text`: after the "language X<asr_text>" tag the model
    # writes when detecting, before the EOS. (0, 0): none, or not reported.
    text_tokens: tuple[int, int] = (0, 0)
    # Entry for entry with token_ids[text_tokens[0]:text_tokens[1]]: the characters each token adds to the raw
    # decoded text ("" for a token that ends inside a multi-byte character: its character comes with the next), so
    # word confidences can be read off the tokens each word spans. () when not reported.
    text_token_pieces: tuple[str, ...] = ()

    @property
    def text_token_probs(self) -> tuple[float, ...]:
        """The probabilities of the tokens that spell `text` (empty when not reported or no text was generated)."""
        start, end = self.text_tokens
        return tuple(math.exp(lp) for lp in self.token_logprobs[start:end])

    @property
    def queue_wait_ms(self) -> float:
        return max(0.0, (self.batch.start_ns - self.enqueued_ns) / 1e6)

    @property
    def inference_ms(self) -> float:
        return (self.batch.end_ns - self.batch.start_ns) / 1e6


@dataclass
class WorkItem:
    """A request inside the engine, with when it arrived. Owned by the engine thread once submitted."""

    request: DecodeRequest
    enqueued_ns: int
    enqueued_monotonic_s: float


class WaitingQueue:
    """The requests a batching core (fake, generate) holds before it runs them, in admission order: priority,
    then arrival."""

    def __init__(self) -> None:
        self._items: list[WorkItem] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: WorkItem) -> None:
        # After every waiting request of the same or a more urgent priority: arrival order within a priority.
        bisect.insort_right(self._items, item, key=lambda w: w.request.priority)

    def remove(self, request_id: str) -> None:
        self._items = [w for w in self._items if w.request.request_id != request_id]

    def take(self, count: int) -> list[WorkItem]:
        """The next `count` requests to run, out of the queue."""
        taken, self._items = self._items[:count], self._items[count:]
        return taken

    def oldest_monotonic_s(self) -> float | None:
        """When the longest-waiting request arrived (the batch-wait deadline counts from it)."""
        return min((w.enqueued_monotonic_s for w in self._items), default=None)
