"""The synchronous client: `AsrClient(target).transcribe(audio)` like `qwen_asr.Qwen3ASRModel.transcribe`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, overload

import grpc
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr_client._core import (
    DEFAULT_LIVE_FORMAT,
    DEFAULT_STREAM_THRESHOLD_BYTES,
    DEFAULT_TARGET,
    ChannelMode,
    Job,
    Progress,
    auth_metadata,
    channel_mode_pb,
    channel_options,
    is_single_audio,
    live_config,
    pcm_frames,
    plan_alignments,
    plan_batch,
    stream_upload,
)
from asr_client.audio import AudioLike, PreparedAudio, bytes_per_second, frame_to_bytes
from asr_client.errors import AsrError, error_from_rpc
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

__all__ = ["DEFAULT_TARGET", "AsrClient"]

Frame = bytes | bytearray | memoryview | npt.NDArray[Any]


class AsrClient:
    """A connection to a Qwen3-ASR server. Thread-safe; use one per process and close it (or use `with`).

    `credentials`: `tls_credentials(ca_file=..., cert_file=..., key_file=...)` (or any `grpc.ssl_channel_credentials`)
    for TLS and mTLS; None for a plaintext channel.
    `auth_token`: sent as "authorization: Bearer <token>" for servers started with --auth-token.
    `timeout_s`: the deadline of every call (None: none). A call past it raises `DeadlineExceededError`.
    `max_new_tokens`: the most tokens generated per chunk of audio, as `Qwen3ASRModel.from_pretrained(...,
    max_new_tokens=)`; 0: the server's default (`server_info().limits.default_max_new_tokens`).
    `retries`: gRPC's own retries of calls that fail UNAVAILABLE or RESOURCE_EXHAUSTED (a restart, a full queue):
    at most 4 attempts with exponential backoff from 0.2 s (see `asr_client._core.RETRY_POLICY`); False: none.
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
            self._channel = grpc.insecure_channel(target, options=opts)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=opts)
        self._stub = pb_grpc.AsrServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout_s = timeout_s
        self._metadata = auth_metadata(auth_token)
        self._stream_threshold_bytes = stream_threshold_bytes
        self._fetch_timeout_s = fetch_timeout_s
        self._max_new_tokens = max_new_tokens

    def __enter__(self) -> AsrClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # ---- the qwen_asr-shaped API ----

    @overload
    def transcribe(
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
    def transcribe(
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

    def transcribe(
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
        """Transcribes one audio input or a list of them; returns one `ASRTranscription` per input, in order.

        `audio`: a path, an http(s) URL, a ``data:audio/...;base64,`` URL or bare base64, encoded file bytes,
        `RawAudio`, a ``(numpy array, sample_rate)`` tuple (normalised as `qwen_asr` does: see `asr_client.audio`),
        or a list of these (sent concurrently; the server batches them).
        `context` and `language` (a name such as "English" or a code such as "en"; None: detect) are either
        one value for every input or a list as long as `audio` (else ValueError).
        `return_time_stamps`: word timestamps in `.time_stamps` (the server needs its forced aligner; without one
        `FailedPreconditionError`, a `ValueError`).
        `max_new_tokens`: per call, overriding the constructor's (None: that one).
        `channel_mode`: "downmix" (channels averaged, one result per input) or "separate" (every channel on its
        own: a list of one result per channel, `.channel_index` 0, 1, ..., for every input).
        `endpointing`: cut the audio into utterances at pauses, one `.segments` entry each (server defaults for an
        empty `EndpointingConfig()`).
        `progress`: called with the number of audio bytes each time some were handed to gRPC (a progress bar).
        """
        jobs = plan_batch(
            audio, context, language, return_time_stamps, fetch_timeout_s=self._fetch_timeout_s,
            max_new_tokens=self._max_new_tokens if max_new_tokens is None else max_new_tokens,
            channel_mode=channel_mode, endpointing=endpointing,
        )
        calls = [self._start(job, progress) for job in jobs]
        try:
            responses = [self._result(method, call) for method, call in calls]
        finally:
            for _, call in calls:
                call.cancel()  # no-op for finished calls; frees the others after a failure
        return transcriptions_from_pb(responses, channel_mode=channel_mode, time_stamps=return_time_stamps)

    def get_supported_languages(self) -> list[str]:
        """The languages `transcribe(language=)` takes, by name, as `Qwen3ASRModel.get_supported_languages()`
        (from the server's GetServerInfo: the model's 30)."""
        return [language.name for language in self.server_info().languages]

    def get_supported_aligner_languages(self) -> list[str]:
        """The languages word timestamps and `align` cover, by name (the forced aligner's 11), as
        `Qwen3ForcedAligner`'s supported languages; empty when the server has no aligner."""
        return [language.name for language in self.server_info().aligner_languages]

    def align(
        self,
        audio: AudioLike | Sequence[AudioLike],
        text: str | Sequence[str],
        language: str | Sequence[str],
    ) -> list[ForcedAlignResult]:
        """Times the words of known transcripts in audio, like `qwen_asr.Qwen3ForcedAligner.align`: one
        `ForcedAlignResult` (items with `.text`, `.start_time`, `.end_time` in seconds) per audio input, in order.

        `audio` as in `transcribe` (one input or a list, sent concurrently; the server batches them); `text` and
        `language` (one of the aligner's 11, by name or code) are one value for every input or a list as long as
        `audio` (else ValueError). The server needs its forced aligner (`FailedPreconditionError` without one); an
        empty text, an uncovered language or audio over the aligner's limit raise `InvalidArgumentError` /
        `ResourceExhaustedError` with the server's reason.
        """
        responses = self.align_requests(plan_alignments(audio, text, language, fetch_timeout_s=self._fetch_timeout_s))
        return [align_result(r.words) for r in responses]

    def align_requests(self, requests: Sequence[pb.AlignRequest]) -> list[pb.AlignResponse]:
        """Align calls, concurrently, returning the full protobuf responses in order."""
        calls = [self._stub.Align.future(r, timeout=self._timeout_s, metadata=self._metadata) for r in requests]
        try:
            responses: list[pb.AlignResponse] = []
            for call in calls:
                try:
                    responses.append(call.result())
                except grpc.RpcError as exc:
                    raise error_from_rpc("Align", exc, timeout_s=self._timeout_s) from exc
        finally:
            for call in calls:
                call.cancel()  # type: ignore[no-untyped-call]
        return responses

    def stream(
        self,
        audio: AudioLike | Iterable[Frame],
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
    ) -> Iterator[StreamingResult]:
        """Live recognition over StreamingRecognize: yields interim (if asked) and final results as they come.

        `audio` is a file, URL, bytes or ``(array, rate)`` (decoded to PCM and sent in `frame_ms` frames), or an
        iterable of frames: bytes laid out as `audio_format` says (default LINEAR16, 16 kHz, mono) or numpy
        arrays (converted to that encoding).
        `realtime` (default False, as `asr-client stream` without --realtime): False sends audio as fast as the
        connection takes it (a live source's iterator paces itself by yielding frames as they are recorded);
        True paces a recording like a live source, each frame once its time has passed. `timeout_s` is the
        deadline of the whole stream (None: none). `channel_mode="separate"`: every channel recognised on its own;
        each result's `channel_index` says which. Raises `UnimplementedError` when the server does not serve
        StreamingRecognize.
        """
        separate = channel_mode == "separate"
        if is_single_audio(audio):
            fmt, frames = pcm_frames(
                audio, frame_ms, fetch_timeout_s=self._fetch_timeout_s, separate_channels=separate  # type: ignore[arg-type]
            )
            source: Iterable[Frame] = frames
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
        upload = _Upload(first, source, fmt, realtime)
        call = self._stub.StreamingRecognize(upload, timeout=timeout_s, metadata=self._metadata)
        try:
            for response in call:
                if response.WhichOneof("event") == "result":
                    yield streaming_result_from_pb(response, time_stamps=return_time_stamps)
        except grpc.RpcError as exc:
            upload.raise_if_failed()
            raise error_from_rpc("StreamingRecognize", exc, timeout_s=timeout_s) from exc
        finally:
            call.cancel()  # type: ignore[no-untyped-call]  # ends the upload when the caller stops early
        upload.raise_if_failed()

    # ---- health and server info ----

    def health(self, service: str = "") -> str:
        """The health status name: "SERVING", "NOT_SERVING" (loading or shutting down), ..."""
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise error_from_rpc("Health/Check", exc, timeout_s=self._timeout_s) from exc
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_until_serving(self, timeout_s: float = 120.0, *, poll_s: float = 0.25) -> None:
        """Polls health until SERVING (the server loads its model first); raises TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health()
                if last == "SERVING":
                    return
            except AsrError as exc:
                last = str(exc)
            time.sleep(poll_s)
        raise TimeoutError(f"the server was not SERVING within {timeout_s:g} s (last: {last})")

    def server_info(self) -> pb.GetServerInfoResponse:
        """Model, languages, limits and features of the server."""
        try:
            response: pb.GetServerInfoResponse = self._stub.GetServerInfo(
                pb.GetServerInfoRequest(), timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise error_from_rpc("GetServerInfo", exc, timeout_s=self._timeout_s) from exc
        return response

    # ---- protobuf-level calls ----

    def transcribe_bytes(
        self,
        audio: bytes,
        *,
        audio_format: pb.AudioFormat | None = None,
        language: str = "",
        context: str = "",
        return_word_timestamps: bool = False,
        max_new_tokens: int = 0,
        channel_mode: ChannelMode = "downmix",
    ) -> pb.TranscribeResponse:
        """One Transcribe call (TranscribeStream for large audio) returning the full protobuf response."""
        config = pb.RecognitionConfig(
            audio_format=audio_format or pb.AudioFormat(),
            language=language,
            context=context,
            return_word_timestamps=return_word_timestamps,
            max_new_tokens=max_new_tokens or self._max_new_tokens,
            channel_mode=channel_mode_pb(channel_mode),
        )
        method, call = self._start(Job(PreparedAudio(bytes(audio), config.audio_format, "bytes"), config))
        return self._result(method, call)

    def transcribe_file(self, path: str | Path, **options: Any) -> pb.TranscribeResponse:
        return self.transcribe_bytes(Path(path).read_bytes(), **options)

    # ---- internals ----

    def _start(self, job: Job, progress: Progress | None = None) -> tuple[str, grpc.Future[pb.TranscribeResponse]]:
        if len(job.audio.data) <= self._stream_threshold_bytes:
            request = pb.TranscribeRequest(config=job.config, audio=job.audio.data)
            future = self._stub.Transcribe.future(request, timeout=self._timeout_s, metadata=self._metadata)
            if progress is not None:
                progress(len(job.audio.data))
            return "Transcribe", future
        return "TranscribeStream", self._stub.TranscribeStream.future(
            stream_upload(job, progress=progress), timeout=self._timeout_s, metadata=self._metadata
        )

    def _result(self, method: str, call: grpc.Future[pb.TranscribeResponse]) -> pb.TranscribeResponse:
        try:
            response: pb.TranscribeResponse = call.result()
        except grpc.RpcError as exc:
            raise error_from_rpc(method, exc, timeout_s=self._timeout_s) from exc
        return response


class _Upload(Iterator[pb.StreamingRecognizeRequest]):
    """The request side of a live stream: the config, then frames, paced in real time if asked.

    gRPC pulls it from its own thread and hides exceptions raised here behind CANCELLED, so one (a bad frame
    from the caller's iterator) is kept and re-raised to the caller by `raise_if_failed`.
    """

    def __init__(
        self, first: pb.StreamingRecognizeRequest, frames: Iterable[Frame], fmt: pb.AudioFormat, realtime: bool
    ) -> None:
        self._first: pb.StreamingRecognizeRequest | None = first
        self._frames = iter(frames)
        self._format = fmt
        self._bytes_per_second = bytes_per_second(fmt)
        self._realtime = realtime
        self._sent_bytes = 0
        self._started = 0.0
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def __next__(self) -> pb.StreamingRecognizeRequest:
        if self._first is not None:
            first, self._first = self._first, None
            self._started = time.monotonic()
            return first
        try:
            data = frame_to_bytes(next(self._frames), self._format)
        except StopIteration:
            raise
        except BaseException as exc:
            with self._lock:
                self._error = exc
            raise StopIteration from exc
        self._sent_bytes += len(data)
        if self._realtime:
            # A live source delivers a frame once it has been recorded: at the end of its time span.
            delay = self._started + self._sent_bytes / self._bytes_per_second - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        return pb.StreamingRecognizeRequest(audio=data)

    def raise_if_failed(self) -> None:
        with self._lock:
            error = self._error
        if error is not None:
            raise error
