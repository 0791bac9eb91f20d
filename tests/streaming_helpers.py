"""Driving StreamingRecognize from tests and benchmarks: pacing, collection, 16 kHz LINEAR16 framing; and an engine
that counts what a StreamingSession asks of it."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np

from asr_server.config import Config, ContinuousConfig, ModelConfig
from asr_server.engine.fake import fake_transcript
from asr_server.engine.types import BatchStats, DecodePriority, DecodeRequest, DecodeResult
from asr_server.transcription import DecodeBackend
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config

T = TypeVar("T")

LINEAR16_16K = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000, channel_count=1)


def tiny_stream_cache_config(asr_hf: str) -> Config:
    """The continuous engine on the tiny checkpoint (fp32, CPU) with torch features: live streams keep their
    encoder windows (the stream cache)."""
    model = ModelConfig(model=asr_hf, device="cpu", dtype="float32")
    continuous = ContinuousConfig(max_running=8, kv_cache_tokens=8192, features="torch")
    return dataclasses.replace(fake_config(kind="continuous", max_batch_wait_ms=0, continuous=continuous), model=model)


async def transcribe_spans(
    stub: pb_grpc.AsrServiceStub, data: bytes, results: Sequence[Any], max_new_tokens: int
) -> list[pb.TranscribeResponse]:
    """Unary Transcribe of exactly each result's [start_ms, end_ms) of a 16 kHz LINEAR16 recording."""
    config = pb.RecognitionConfig(audio_format=LINEAR16_16K, max_new_tokens=max_new_tokens)
    return [
        await stub.Transcribe(pb.TranscribeRequest(config=config, audio=data[r.start_ms * 32 : r.end_ms * 32]))
        for r in results
    ]


def pcm16(samples: np.ndarray) -> bytes:
    """float32 [-1, 1] (n,) or (n, channels) -> interleaved LINEAR16 bytes."""
    return np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2").tobytes()


def pcm16_roundtrip(samples: np.ndarray) -> np.ndarray:
    """What the server decodes from pcm16(samples)."""
    return (np.clip(np.round(samples * 32767), -32768, 32767).astype(np.int16) / 32768.0).astype(np.float32)


def stream_config(
    fmt: pb.AudioFormat = LINEAR16_16K, *, interim: bool = False, interval_ms: int = 0, single: bool = False,
    endpointing: pb.EndpointingConfig | None = None, **config: object,
) -> pb.StreamingRecognizeRequest:
    recognition = pb.RecognitionConfig(audio_format=fmt, **config)  # type: ignore[arg-type]
    if endpointing is not None:
        recognition.endpointing.CopyFrom(endpointing)
    return pb.StreamingRecognizeRequest(
        config=pb.StreamingRecognitionConfig(
            config=recognition, interim_results=interim, interim_interval_ms=interval_ms, single_utterance=single
        )
    )


@dataclass
class Received:
    """Responses of one stream with their arrival times (seconds since the stream started)."""

    responses: list[tuple[float, pb.StreamingRecognizeResponse]] = field(default_factory=list)
    # When each audio piece was sent: (time, stream position in ms after the piece).
    sent: list[tuple[float, int]] = field(default_factory=list)

    @property
    def finals(self) -> list[pb.StreamingResult]:
        return [r.result for _, r in self.responses if r.HasField("result") and r.result.is_final]

    @property
    def interims(self) -> list[tuple[float, pb.StreamingResult]]:
        return [(t, r.result) for t, r in self.responses if r.HasField("result") and not r.result.is_final]

    def events(self, kind: int) -> list[pb.SpeechEvent]:
        return [r.speech_event for _, r in self.responses if r.HasField("speech_event") and r.speech_event.type == kind]


async def audio_requests(
    data: bytes,
    *,
    bytes_per_ms: int,
    piece_ms: int,
    realtime: float = 0.0,
    sent: list[tuple[float, int]] | None = None,
    started: float | None = None,
    head: Sequence[pb.StreamingRecognizeRequest] = (),
) -> AsyncIterator[pb.StreamingRecognizeRequest]:
    """`head` messages, then `data` in pieces of piece_ms; `realtime` > 0 paces at that multiple of real time."""
    for message in head:
        yield message
    begin = started if started is not None else time.perf_counter()
    step = piece_ms * bytes_per_ms
    for offset in range(0, len(data), step):
        if realtime > 0:
            due = begin + (offset / bytes_per_ms) / 1000 / realtime
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        yield pb.StreamingRecognizeRequest(audio=data[offset : offset + step])
        if sent is not None:
            sent.append((time.perf_counter() - begin, (offset + step) // bytes_per_ms))


async def run_stream(
    stub: pb_grpc.AsrServiceStub,
    config: pb.StreamingRecognizeRequest,
    data: bytes,
    *,
    bytes_per_ms: int = 32,
    piece_ms: int = 20,
    realtime: float = 0.0,
) -> Received:
    received = Received()
    started = time.perf_counter()
    requests = audio_requests(
        data, bytes_per_ms=bytes_per_ms, piece_ms=piece_ms, realtime=realtime, sent=received.sent,
        started=started, head=[config],
    )
    async for response in stub.StreamingRecognize(requests):
        received.responses.append((time.perf_counter() - started, response))
    return received


def _value_now(coroutine: Coroutine[Any, Any, T]) -> T:
    """The value of a coroutine that completes without suspending (grpc.aio's code()/details() of a finished call)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("the call has no status yet")


class ServerStatus:
    """The status the server ended a call with, as the client's transport first delivered it.

    grpc.aio's client replaces a status it has already received with INTERNAL "Internal error from Core" when one of
    its writes was still under way as the server ended the call (the write fails, and `_write` sets that status over
    the server's: grpc/grpc#36066, open; the sync API and other gRPC implementations report the server's status). A
    client that keeps sending until the server hangs up, as a live call does, hits it under load. This reads the
    status at the moment it is first set, in the call's done callback, before a failed write can replace it.
    """

    _LOST = "Internal error from Core"

    def __init__(self, call: grpc.aio.Call) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()
        call.add_done_callback(self._on_done)

    def _on_done(self, call: grpc.aio.Call) -> None:
        if self.code is None:
            self.code = _value_now(call.code())
            self.details = _value_now(call.details()) or ""
            self.trailing_metadata = tuple(_value_now(call.trailing_metadata()) or ())

    @property
    def retry_info(self) -> bool:
        """Whether the status details carry a google.rpc.RetryInfo (retry advice)."""
        from google.rpc import status_pb2

        for key, value in self.trailing_metadata:
            if key == "grpc-status-details-bin" and isinstance(value, bytes):
                status = status_pb2.Status.FromString(value)
                return any(d.type_url.endswith("google.rpc.RetryInfo") for d in status.details)
        return False

    @property
    def replaced_by_grpc(self) -> bool:
        """Whether this is grpc.aio's own INTERNAL (a failed write processed before the server's status)."""
        return self.code is grpc.StatusCode.INTERNAL and self.details == self._LOST


class CountingEngine:
    """A Transcriber backend that counts the work it is given: decodes, and the 16 kHz samples they cover.

    Without `inner` it answers each decode at once, inside the event loop, with the fake engine's text (no thread,
    so nothing depends on timing); with `inner` (e.g. an EngineRunner) it passes each decode on. Tests that
    call `settle()` after every piece they feed get every decode answered before the next piece arrives, so what
    a session decodes depends only on its audio, not on how fast the machine is.
    """

    model_id = "counting"

    def __init__(self, inner: DecodeBackend | None = None) -> None:
        self._inner = inner
        self.decodes = 0
        self.samples = 0
        self.max_samples = 0
        self.by_priority: dict[DecodePriority, int] = {}
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def decode(self, request: DecodeRequest) -> DecodeResult:
        size = request.audio_16k.shape[0]
        self.decodes += 1
        self.samples += size
        self.max_samples = max(self.max_samples, size)
        self.by_priority[request.priority] = self.by_priority.get(request.priority, 0) + 1
        if self._inner is None:
            return _answer_now(request)
        self._pending += 1
        self._idle.clear()
        try:
            return await self._inner.decode(request)
        finally:
            self._pending -= 1
            if not self._pending:
                self._idle.set()

    async def settle(self) -> None:
        """Returns once every decode asked for so far is answered, and the answers asked for no new ones."""
        while True:
            await self._idle.wait()
            before = self.decodes
            # Tasks created since the caller last yielded (by `feed`, or by an answer just handled) take their first
            # step now, which is where a decode is submitted.
            await asyncio.sleep(0)
            if self.decodes == before and self._idle.is_set():
                return


def _answer_now(request: DecodeRequest) -> DecodeResult:
    text, ids = fake_transcript(request)
    language = request.options.language or ("English" if text else "")
    now_ns = time.time_ns()
    stats = BatchStats(batch_size=1, audio_s=request.audio_s, generated_tokens=len(ids), start_ns=now_ns, end_ns=now_ns)
    return DecodeResult(request.request_id, text, language, ids, now_ns, stats, now_ns)
