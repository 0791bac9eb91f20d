"""What travels between the front (the gRPC server process) and an engine process: msgspec Structs in msgpack.

One msgpack frame per message, a tagged union, so either side decodes any frame with one typed decoder and never
unpickles anything. A Submit's audio follows its header as a second frame of the same ZeroMQ message (as vLLM
sends large tensors beside its msgpack): the raw little-endian float32 bytes of the 16 kHz samples, sent from the
array's own memory and read back with numpy.frombuffer over the received frame, so no copy is made in Python on
either side (a msgpack bin field would cost three: tobytes, the encoder's buffer, the decoder's bytes). Errors
travel as their AsrError class name, message and retry advice, and are raised in the front as the same class with
the same text, so the gRPC status a caller sees is the one an in-process engine would give.
"""

from __future__ import annotations

import msgspec
import numpy as np

from asr_server.engine.core import CoreStats
from asr_server.engine.types import BatchStats, DecodeOptions, DecodePriority, DecodeRequest, DecodeResult
from asr_server.errors import AsrError, FailedPrecondition, InvalidInput, LimitExceeded, Unavailable

_AUDIO_DTYPE = np.dtype("<f4")


class Submit(msgspec.Struct, tag="submit", frozen=True):
    """front -> engine: decode one piece of audio."""

    request_id: str
    audio_samples: int  # the second frame holds this many float32 samples
    language: str | None
    context: str
    max_new_tokens: int
    prefix_text: str = ""
    forced_num_tokens: int | None = None
    # DecodeRequest's scheduling fields: a stream's final before recorded audio before interims, and the key of
    # the live utterance whose encoder state the engine keeps.
    priority: int = 1
    stream_key: str | None = None
    # A live final's draft (its utterance's last interim's tokens), verified in one pass by the engine.
    draft_token_ids: tuple[int, ...] = ()


class Abort(msgspec.Struct, tag="abort", frozen=True):
    """front -> engine: the caller went away; drop the request."""

    request_id: str


class StatsQuery(msgspec.Struct, tag="stats?", frozen=True):
    """front -> engine: how much the engine holds (tests and operators)."""

    query_id: int


class Hello(msgspec.Struct, tag="hello", frozen=True):
    """front -> engine, on a shared engine's ROUTER socket (--front-processes > 1): the front's heartbeat. The
    engine answers each with Ready, whose pid tells the front whether the engine it talks to was restarted."""


class Ready(msgspec.Struct, tag="ready", frozen=True):
    """engine -> front: the model is loaded and warmed up (also the answer to a Hello)."""

    model_id: str
    pid: int


class StartFailed(msgspec.Struct, tag="start-failed", frozen=True):
    """engine -> front: loading the core failed; the process exits after this."""

    message: str


class Result(msgspec.Struct, tag="result", frozen=True):
    """engine -> front: a DecodeResult, field for field."""

    request_id: str
    text: str
    language: str
    token_ids: list[int]
    enqueued_ns: int
    batch_size: int
    batch_audio_s: float
    batch_generated_tokens: int
    batch_start_ns: int
    batch_end_ns: int
    first_token_ns: int
    token_logprobs: list[float] = []
    text_tokens: tuple[int, int] = (0, 0)
    text_token_pieces: list[str] = []


class Failure(msgspec.Struct, tag="failure", frozen=True):
    """engine -> front: a request failed. `kind` names the AsrError class ("" for any other exception: INTERNAL)."""

    request_id: str
    kind: str
    message: str
    retryable: bool = False
    retry_after_s: float | None = None


class Stats(msgspec.Struct, tag="stats", frozen=True):
    """engine -> front: the answer to a StatsQuery."""

    query_id: int
    in_flight: int  # requests the engine process holds (queued or decoding)
    submitted: int
    aborted: int  # aborts that found their request still in the engine
    finished: int


class CoreStatsPush(msgspec.Struct, tag="core-stats", frozen=True):
    """engine -> front, unasked: the core's CoreStats (engine/core.py), about once a second while they change, so
    the front's metrics scrape reads the last one it got instead of waiting on a round trip."""

    steps: int
    rows: int
    batch_size_counts: list[int]
    generated_tokens: int
    kv_pages_used: int | None = None
    kv_pages_total: int | None = None
    waiting_requests: int | None = None
    running_requests: int | None = None


ToEngine = Submit | Abort | StatsQuery | Hello
FromEngine = Ready | StartFailed | Result | Failure | Stats | CoreStatsPush

_to_engine = msgspec.msgpack.Decoder(ToEngine)
_from_engine = msgspec.msgpack.Decoder(FromEngine)
_encoder = msgspec.msgpack.Encoder()


def encode(message: ToEngine | FromEngine) -> bytes:
    return _encoder.encode(message)


def decode_to_engine(frame: bytes | memoryview) -> ToEngine:
    return _to_engine.decode(frame)


def decode_from_engine(frame: bytes | memoryview) -> FromEngine:
    return _from_engine.decode(frame)


# ---- domain values <-> messages ----


def submit_frames(request: DecodeRequest) -> list[bytes | memoryview]:
    """The ZeroMQ message that submits `request`: the Submit header, then the samples' bytes (not copied)."""
    audio = np.ascontiguousarray(request.audio_16k, dtype=_AUDIO_DTYPE)
    options = request.options
    header = Submit(
        request_id=request.request_id,
        audio_samples=int(audio.shape[0]),
        language=options.language,
        context=options.context,
        max_new_tokens=options.max_new_tokens,
        prefix_text=request.prefix_text,
        forced_num_tokens=request.forced_num_tokens,
        priority=int(request.priority),
        stream_key=request.stream_key,
        draft_token_ids=request.draft_token_ids,
    )
    return [encode(header), memoryview(audio.data).cast("B")]


def request_from_submit(message: Submit, audio_frame: bytes | memoryview) -> DecodeRequest:
    """The request a Submit and its audio frame carry; the samples are a read-only view of the frame."""
    if len(audio_frame) != message.audio_samples * _AUDIO_DTYPE.itemsize:
        raise ValueError(f"a Submit of {message.audio_samples} samples came with {len(audio_frame)} audio bytes")
    audio = np.frombuffer(audio_frame, dtype=_AUDIO_DTYPE).astype(np.float32, copy=False)
    return DecodeRequest(
        request_id=message.request_id,
        audio_16k=audio,
        options=DecodeOptions(message.language, message.context, message.max_new_tokens),
        prefix_text=message.prefix_text,
        forced_num_tokens=message.forced_num_tokens,
        priority=DecodePriority(message.priority),
        stream_key=message.stream_key,
        draft_token_ids=tuple(message.draft_token_ids),
    )


def core_stats_message(stats: CoreStats) -> CoreStatsPush:
    return CoreStatsPush(
        steps=stats.steps,
        rows=stats.rows,
        batch_size_counts=list(stats.batch_size_counts),
        generated_tokens=stats.generated_tokens,
        kv_pages_used=stats.kv_pages_used,
        kv_pages_total=stats.kv_pages_total,
        waiting_requests=stats.waiting_requests,
        running_requests=stats.running_requests,
    )


def core_stats_from_message(message: CoreStatsPush) -> CoreStats:
    return CoreStats(
        steps=message.steps,
        rows=message.rows,
        batch_size_counts=tuple(message.batch_size_counts),
        generated_tokens=message.generated_tokens,
        kv_pages_used=message.kv_pages_used,
        kv_pages_total=message.kv_pages_total,
        waiting_requests=message.waiting_requests,
        running_requests=message.running_requests,
    )


def result_message(result: DecodeResult) -> Result:
    batch = result.batch
    return Result(
        request_id=result.request_id,
        text=result.text,
        language=result.language,
        token_ids=list(result.token_ids),
        enqueued_ns=result.enqueued_ns,
        batch_size=batch.batch_size,
        batch_audio_s=batch.audio_s,
        batch_generated_tokens=batch.generated_tokens,
        batch_start_ns=batch.start_ns,
        batch_end_ns=batch.end_ns,
        first_token_ns=result.first_token_ns,
        token_logprobs=list(result.token_logprobs),
        text_tokens=result.text_tokens,
        text_token_pieces=list(result.text_token_pieces),
    )


def result_from_message(message: Result) -> DecodeResult:
    batch = BatchStats(
        batch_size=message.batch_size,
        audio_s=message.batch_audio_s,
        generated_tokens=message.batch_generated_tokens,
        start_ns=message.batch_start_ns,
        end_ns=message.batch_end_ns,
    )
    return DecodeResult(
        request_id=message.request_id,
        text=message.text,
        language=message.language,
        token_ids=tuple(message.token_ids),
        enqueued_ns=message.enqueued_ns,
        batch=batch,
        first_token_ns=message.first_token_ns,
        token_logprobs=tuple(message.token_logprobs),
        text_tokens=(message.text_tokens[0], message.text_tokens[1]),
        text_token_pieces=tuple(message.text_token_pieces),
    )


# The AsrError classes an engine raises, by the name that travels. Subclasses travel as their nearest listed base,
# which is what decides the gRPC status.
_ERROR_KINDS: tuple[tuple[str, type[AsrError]], ...] = (
    ("InvalidInput", InvalidInput),
    ("LimitExceeded", LimitExceeded),
    ("FailedPrecondition", FailedPrecondition),
    ("Unavailable", Unavailable),
    ("AsrError", AsrError),
)


def failure_message(request_id: str, error: BaseException) -> Failure:
    for kind, cls in _ERROR_KINDS:
        if isinstance(error, cls):
            retryable = isinstance(error, LimitExceeded) and error.retryable
            return Failure(request_id, kind, str(error), retryable, error.retry_after_s)
    # Not an AsrError: a bug in the engine. The front raises it as EngineFault, which the edge answers INTERNAL.
    return Failure(request_id, "", f"{type(error).__name__}: {error}")


class EngineFault(RuntimeError):
    """An exception in the engine process that was not an AsrError (INTERNAL at the edge, as in-process)."""


def error_from_failure(message: Failure) -> Exception:
    if message.kind == "LimitExceeded":
        if message.retryable and message.retry_after_s is not None:
            return LimitExceeded(message.message, retryable=True, retry_after_s=message.retry_after_s)
        return LimitExceeded(message.message, retryable=message.retryable)
    if message.kind == "Unavailable":
        if message.retry_after_s is not None:
            return Unavailable(message.message, retry_after_s=message.retry_after_s)
        return Unavailable(message.message)
    for kind, cls in _ERROR_KINDS:
        if kind == message.kind:
            return cls(message.message)
    return EngineFault(message.message)
