"""The AsrService servicer: protobuf in, domain calls, protobuf out, errors as precise gRPC statuses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc
from opentelemetry.trace import Span, StatusCode
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc

from asr_server.audio.assembler import StreamAssembler
from asr_server.audio.decode import DecodedAudio, container_formats, decode_audio
from asr_server.audio.formats import AudioLimits
from asr_server.config import Config
from asr_server.edge import convert
from asr_server.errors import (
    AsrError,
    Cancelled,
    FailedPrecondition,
    InvalidInput,
    LimitExceeded,
    Unavailable,
)
from asr_server.tracing import rpc_span
from asr_server.transcription import TranscribeOptions, Transcriber

logger = logging.getLogger(__name__)
T = TypeVar("T")

_CODES: tuple[tuple[type[AsrError], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Cancelled, grpc.StatusCode.CANCELLED),
)

# Raw sample rates and channel counts the audio layer accepts; published in GetServerInfo.
MIN_SAMPLE_RATE_HZ = 8_000
MAX_SAMPLE_RATE_HZ = 48_000
MAX_CHANNEL_COUNT = 8


def status_for(exc: AsrError) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class AsrServicer(pb_grpc.AsrServiceServicer):
    def __init__(
        self,
        config: Config,
        transcriber: Transcriber,
        *,
        model_id: Callable[[], str],
        aligner_ready: Callable[[], bool],
    ) -> None:
        self._config = config
        self._transcriber = transcriber
        self._model_id = model_id
        self._aligner_ready = aligner_ready
        limits = config.limits
        self._audio_limits = AudioLimits(
            max_audio_duration_s=limits.max_audio_duration_s,
            max_message_bytes=limits.max_message_bytes,
            max_stream_bytes=limits.max_stream_bytes,
        )

    # ---- RPCs ----

    async def Transcribe(  # noqa: N802 - gRPC method name
        self,
        request: pb.TranscribeRequest,
        context: grpc.aio.ServicerContext[pb.TranscribeRequest, pb.TranscribeResponse],
    ) -> pb.TranscribeResponse:
        async def run(span: Span) -> pb.TranscribeResponse:
            started = time.perf_counter()
            if len(request.audio) > self._config.limits.max_message_bytes:
                raise LimitExceeded(
                    f"audio is {len(request.audio)} bytes; Transcribe takes at most "
                    f"{self._config.limits.max_message_bytes} bytes per message: "
                    "send larger audio with TranscribeStream"
                )
            audio_format = convert.audio_format_from_pb(request.config.audio_format)
            options = convert.options_from_pb(request.config, self._config)
            decode_started = time.perf_counter()
            audio = await asyncio.to_thread(decode_audio, request.audio, audio_format, limits=self._audio_limits)
            return await self._finish(span, audio, options, started, time.perf_counter() - decode_started)

        return await self._guard("Transcribe", context, run)

    async def TranscribeStream(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.TranscribeStreamRequest],
        context: grpc.aio.ServicerContext[pb.TranscribeStreamRequest, pb.TranscribeResponse],
    ) -> pb.TranscribeResponse:
        async def run(span: Span) -> pb.TranscribeResponse:
            started = time.perf_counter()
            assembler: StreamAssembler | None = None
            options: TranscribeOptions | None = None
            received_bytes = 0
            async for message in request_iterator:
                payload = message.WhichOneof("payload")
                if assembler is None:
                    if payload != "config":
                        raise InvalidInput(
                            "the first TranscribeStreamRequest must carry config (audio_format, language, ...); "
                            f"got {payload or 'an empty message'}"
                        )
                    audio_format = convert.audio_format_from_pb(message.config.audio_format)
                    options = convert.options_from_pb(message.config, self._config)
                    assembler = StreamAssembler(audio_format, limits=self._audio_limits)
                elif payload == "config":
                    raise InvalidInput(
                        f"config may be sent only once, in the first message; got a second one after "
                        f"{received_bytes} audio bytes"
                    )
                elif payload == "audio":
                    received_bytes += len(message.audio)
                    assembler.append(message.audio)
            if assembler is None or options is None:
                raise InvalidInput("the stream was empty: send a config message, then the audio")
            span.set_attribute("asr.stream.bytes", received_bytes)
            decode_started = time.perf_counter()
            audio = await asyncio.to_thread(assembler.finish)
            return await self._finish(span, audio, options, started, time.perf_counter() - decode_started)

        return await self._guard("TranscribeStream", context, run)

    async def StreamingRecognize(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext[pb.StreamingRecognizeRequest, pb.StreamingRecognizeResponse],
    ) -> AsyncIterator[pb.StreamingRecognizeResponse]:
        with rpc_span("StreamingRecognize", context.invocation_metadata()) as span:
            span.set_status(StatusCode.ERROR, "unimplemented")
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "StreamingRecognize is not served by this server version yet; use TranscribeStream for recorded "
                "audio (see GetServerInfo.features.streaming_recognize)",
            )
        # Unreachable: abort raises. The yield makes this an async generator, as the stub expects.
        yield pb.StreamingRecognizeResponse()  # pragma: no cover

    async def GetServerInfo(  # noqa: N802 - gRPC method name
        self,
        request: pb.GetServerInfoRequest,
        context: grpc.aio.ServicerContext[pb.GetServerInfoRequest, pb.GetServerInfoResponse],
    ) -> pb.GetServerInfoResponse:
        async def run(span: Span) -> pb.GetServerInfoResponse:
            return convert.server_info_to_pb(
                self._config,
                model_id=self._model_id() or self._config.model.model,
                aligner_model_id=self._config.aligner.model,
                aligner_ready=self._aligner_ready(),
                streaming_recognize=False,
                endpointing=False,
                container_formats=container_formats(),
                min_sample_rate_hz=MIN_SAMPLE_RATE_HZ,
                max_sample_rate_hz=MAX_SAMPLE_RATE_HZ,
                max_channel_count=MAX_CHANNEL_COUNT,
            )

        return await self._guard("GetServerInfo", context, run)

    # ---- shared ----

    async def _finish(
        self, span: Span, audio: DecodedAudio, options: TranscribeOptions, started: float, decode_s: float
    ) -> pb.TranscribeResponse:
        span.set_attribute("asr.audio_s", audio.duration_ms / 1000)
        span.set_attribute("asr.channels", len(audio.channels))
        result = await self._transcriber.transcribe(audio, options)
        return convert.result_to_pb(
            result, total_ms=(time.perf_counter() - started) * 1000, audio_decode_ms=decode_s * 1000
        )

    async def _guard(
        self,
        method: str,
        context: grpc.aio.ServicerContext[object, object],
        run: Callable[[Span], Awaitable[T]],
    ) -> T:
        with rpc_span(method, context.invocation_metadata()) as span:
            try:
                return await run(span)
            except AsrError as exc:
                await _abort(context, span, status_for(exc), str(exc))
            except ExceptionGroup as group:
                # A TaskGroup wraps the first failure of a request's chunks; report that one. TaskGroups nest
                # (channels, then chunks), so look through to the innermost failure.
                first: BaseException = group
                while isinstance(first, BaseExceptionGroup) and first.exceptions:
                    first = first.exceptions[0]
                if isinstance(first, AsrError):
                    await _abort(context, span, status_for(first), str(first))
                logger.error("%s failed", method, exc_info=group)
                await _abort(context, span, grpc.StatusCode.INTERNAL, f"internal error: {first}")
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                logger.exception("%s failed", method)
                await _abort(context, span, grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


async def _abort(
    context: grpc.aio.ServicerContext[object, object], span: Span, code: grpc.StatusCode, message: str
) -> NoReturn:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    span.set_status(StatusCode.ERROR, code.name)
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
