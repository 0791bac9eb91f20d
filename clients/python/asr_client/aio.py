"""The asyncio client: the same API as `AsrClient`, with coroutines and async iterators.

    async with AsyncAsrClient("localhost:50051") as client:
        results = await client.transcribe(["a.wav", "b.wav"], language="English")
        async for result in client.stream("call.wav"):
            print(result.is_final, result.text)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any, Literal, overload

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr_client._core import (
    DEFAULT_LIVE_FORMAT,
    DEFAULT_STREAM_THRESHOLD_BYTES,
    DEFAULT_TARGET,
    ChannelMode,
    Job,
    Progress,
    auth_metadata,
    channel_options,
    is_single_audio,
    live_config,
    pcm_frames,
    plan_alignments,
    plan_batch,
    stream_upload,
)
from asr_client.audio import AudioLike, bytes_per_second, frame_to_bytes
from asr_client.client import Frame
from asr_client.errors import AsrError, UnimplementedError, error_from_rpc
from asr_client.results import (
    ASRTranscription,
    ForcedAlignResult,
    StreamingResult,
    align_result,
    streaming_result_from_pb,
    transcriptions_from_pb,
)
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc

__all__ = ["AsyncAsrClient"]

# How a server refuses a stream at its start, before any audio: these do not depend on the audio sent.
_CONFIG_REFUSALS = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
)


class AsyncAsrClient:
    """An asyncio connection to a Qwen3-ASR server; create it inside the event loop that uses it.

    Arguments as for `AsrClient`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        credentials: grpc.ChannelCredentials | None = None,
        *,
        auth_token: str = "",
        timeout_s: float | None = 60.0,
        stream_threshold_bytes: int = DEFAULT_STREAM_THRESHOLD_BYTES,
        fetch_timeout_s: float = 30.0,
        max_new_tokens: int = 0,
        retries: bool = True,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        opts = channel_options(options, retries=retries)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=opts)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=opts)
        self._stub = pb_grpc.AsrServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout_s = timeout_s
        self._metadata = auth_metadata(auth_token)
        self._stream_threshold_bytes = stream_threshold_bytes
        self._fetch_timeout_s = fetch_timeout_s
        self._max_new_tokens = max_new_tokens

    async def __aenter__(self) -> AsyncAsrClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    @overload
    async def transcribe(
        self,
        audio: AudioLike | Sequence[AudioLike],
        context: str | Sequence[str] = "",
        language: str | None | Sequence[str | None] = None,
        return_time_stamps: bool = False,
        *,
        max_new_tokens: int | None = None,
        channel_mode: Literal["downmix"] = "downmix",
        endpointing: pb.EndpointingConfig | None = None,
        progress: Progress | None = None,
    ) -> list[ASRTranscription]: ...

    @overload
    async def transcribe(
        self,
        audio: AudioLike | Sequence[AudioLike],
        context: str | Sequence[str] = "",
        language: str | None | Sequence[str | None] = None,
        return_time_stamps: bool = False,
        *,
        max_new_tokens: int | None = None,
        channel_mode: Literal["separate"],
        endpointing: pb.EndpointingConfig | None = None,
        progress: Progress | None = None,
    ) -> list[list[ASRTranscription]]: ...

    async def transcribe(
        self,
        audio: AudioLike | Sequence[AudioLike],
        context: str | Sequence[str] = "",
        language: str | None | Sequence[str | None] = None,
        return_time_stamps: bool = False,
        *,
        max_new_tokens: int | None = None,
        channel_mode: ChannelMode = "downmix",
        endpointing: pb.EndpointingConfig | None = None,
        progress: Progress | None = None,
    ) -> list[ASRTranscription] | list[list[ASRTranscription]]:
        """As `AsrClient.transcribe`; the inputs of a list are sent concurrently."""
        # Reading files, fetching URLs and resampling arrays block: keep them off the event loop.
        jobs = await asyncio.to_thread(
            plan_batch, audio, context, language, return_time_stamps, fetch_timeout_s=self._fetch_timeout_s,
            max_new_tokens=self._max_new_tokens if max_new_tokens is None else max_new_tokens,
            channel_mode=channel_mode, endpointing=endpointing,
        )
        tasks = [asyncio.ensure_future(self._transcribe_one(job, progress)) for job in jobs]
        try:
            responses = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        return transcriptions_from_pb(responses, channel_mode=channel_mode, time_stamps=return_time_stamps)

    async def get_supported_languages(self) -> list[str]:
        """As `AsrClient.get_supported_languages`."""
        return [language.name for language in (await self.server_info()).languages]

    async def get_supported_aligner_languages(self) -> list[str]:
        """As `AsrClient.get_supported_aligner_languages`."""
        return [language.name for language in (await self.server_info()).aligner_languages]

    async def align(
        self,
        audio: AudioLike | Sequence[AudioLike],
        text: str | Sequence[str],
        language: str | Sequence[str],
    ) -> list[ForcedAlignResult]:
        """As `AsrClient.align`; the inputs of a list are sent concurrently."""
        requests = await asyncio.to_thread(
            plan_alignments, audio, text, language, fetch_timeout_s=self._fetch_timeout_s
        )
        tasks = [asyncio.ensure_future(self._align_one(r)) for r in requests]
        try:
            responses = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        return [align_result(r.words) for r in responses]

    async def _align_one(self, request: pb.AlignRequest) -> pb.AlignResponse:
        try:
            response: pb.AlignResponse = await self._stub.Align(
                request, timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise error_from_rpc("Align", exc, timeout_s=self._timeout_s) from exc
        return response

    async def stream(
        self,
        audio: AudioLike | Iterable[Frame] | AsyncIterable[Frame],
        *,
        audio_format: pb.AudioFormat | None = None,
        language: str | None = None,
        context: str = "",
        return_time_stamps: bool = False,
        interim_results: bool = True,
        interim_interval_ms: int = 0,
        single_utterance: bool = False,
        endpointing: pb.EndpointingConfig | None = None,
        realtime: bool = False,
        frame_ms: int = 20,
        timeout_s: float | None = None,
        max_new_tokens: int | None = None,
        channel_mode: ChannelMode = "downmix",
    ) -> AsyncIterator[StreamingResult]:
        """As `AsrClient.stream` (`realtime` default False there too); frames may also come from an async iterable
        (a microphone callback queue)."""
        if is_single_audio(audio):
            fmt, frames = await asyncio.to_thread(
                pcm_frames,
                audio,  # type: ignore[arg-type]
                frame_ms,
                fetch_timeout_s=self._fetch_timeout_s,
                separate_channels=channel_mode == "separate",
            )
            source: Iterable[Frame] | AsyncIterable[Frame] = frames
        else:
            fmt, source = audio_format or DEFAULT_LIVE_FORMAT, audio  # type: ignore[assignment]
        first = live_config(
            fmt,
            language=language,
            context=context,
            return_time_stamps=return_time_stamps,
            interim_results=interim_results,
            interim_interval_ms=interim_interval_ms,
            single_utterance=single_utterance,
            endpointing=endpointing,
            max_new_tokens=self._max_new_tokens if max_new_tokens is None else max_new_tokens,
            channel_mode=channel_mode,
        )
        failure: list[BaseException] = []

        async def upload() -> AsyncIterator[pb.StreamingRecognizeRequest]:
            yield first
            started = time.monotonic()
            sent = 0
            rate = bytes_per_second(fmt)
            try:
                async for frame in _aiter(source):
                    data = frame_to_bytes(frame, fmt)
                    sent += len(data)
                    if realtime:
                        delay = started + sent / rate - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    yield pb.StreamingRecognizeRequest(audio=data)
            except Exception as exc:
                failure.append(exc)  # re-raised to the caller below; gRPC would report only CANCELLED

        call = self._stub.StreamingRecognize(upload(), timeout=timeout_s, metadata=self._metadata)
        try:
            async for response in call:
                if response.WhichOneof("event") == "result":
                    yield streaming_result_from_pb(response, time_stamps=return_time_stamps)
        except grpc.RpcError as exc:
            if failure:
                raise failure[0] from exc
            error = error_from_rpc("StreamingRecognize", exc, timeout_s=timeout_s)
            raise await self._stream_error(error, first) from exc
        finally:
            call.cancel()
        if failure:
            raise failure[0]

    async def health(self, service: str = "") -> str:
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise error_from_rpc("Health/Check", exc, timeout_s=self._timeout_s) from exc
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def wait_until_serving(self, timeout_s: float = 120.0, *, poll_s: float = 0.25) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = await self.health()
                if last == "SERVING":
                    return
            except AsrError as exc:
                last = str(exc)
            await asyncio.sleep(poll_s)
        raise TimeoutError(f"the server was not SERVING within {timeout_s:g} s (last: {last})")

    async def server_info(self) -> pb.GetServerInfoResponse:
        try:
            response: pb.GetServerInfoResponse = await self._stub.GetServerInfo(
                pb.GetServerInfoRequest(), timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise error_from_rpc("GetServerInfo", exc, timeout_s=self._timeout_s) from exc
        return response

    async def _stream_error(self, error: AsrError, first: pb.StreamingRecognizeRequest) -> AsrError:
        """grpc.aio reports INTERNAL "Internal error from Core" instead of the server's status when the server
        ends a stream while the client is still sending (grpc/grpc#36066), as a server without StreamingRecognize
        does at once, and as one refusing the config (an unknown language) does. GetServerInfo tells the first
        case apart; the config sent alone gets the server's verdict on it in the second."""
        if error.code != grpc.StatusCode.INTERNAL or "Internal error from Core" not in error.details:
            return error
        try:
            serves_streaming = (await self.server_info()).features.streaming_recognize
        except AsrError:
            return error
        if serves_streaming:
            return await self._config_error(first) or error
        return UnimplementedError(
            "StreamingRecognize",
            grpc.StatusCode.UNIMPLEMENTED,
            "this server does not serve StreamingRecognize (GetServerInfo: features.streaming_recognize is false)",
        )

    async def _config_error(self, first: pb.StreamingRecognizeRequest) -> AsrError | None:
        """The server's refusal of this stream config sent without audio (then half-closed), or None."""
        call = self._stub.StreamingRecognize(iter([first]), timeout=10.0, metadata=self._metadata)
        try:
            async for _ in call:
                pass
        except grpc.RpcError as exc:
            verdict = error_from_rpc("StreamingRecognize", exc)
            if verdict.code in _CONFIG_REFUSALS:
                return verdict
        finally:
            call.cancel()
        return None

    async def _transcribe_one(self, job: Job, progress: Progress | None = None) -> pb.TranscribeResponse:
        try:
            if len(job.audio.data) <= self._stream_threshold_bytes:
                method = "Transcribe"
                request = pb.TranscribeRequest(config=job.config, audio=job.audio.data)
                unary = self._stub.Transcribe(request, timeout=self._timeout_s, metadata=self._metadata)
                if progress is not None:
                    progress(len(job.audio.data))
                response: pb.TranscribeResponse = await unary
            else:
                method = "TranscribeStream"
                response = await self._stub.TranscribeStream(
                    stream_upload(job, progress=progress), timeout=self._timeout_s, metadata=self._metadata
                )
        except grpc.RpcError as exc:
            raise error_from_rpc(method, exc, timeout_s=self._timeout_s) from exc
        return response


async def _aiter(frames: Iterable[Frame] | AsyncIterable[Frame]) -> AsyncIterator[Frame]:
    if isinstance(frames, AsyncIterable):
        async for frame in frames:
            yield frame
    else:
        for frame in frames:
            yield frame
