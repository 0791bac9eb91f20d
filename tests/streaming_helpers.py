"""Driving StreamingRecognize from tests and benchmarks: pacing, collection, 16 kHz LINEAR16 framing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc

LINEAR16_16K = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000, channel_count=1)


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
