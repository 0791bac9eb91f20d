"""What flows between the async front and the engine thread. Plain frozen values; no torch, no grpc."""

from __future__ import annotations

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
