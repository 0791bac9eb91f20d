"""What the sync and asyncio clients share: batch broadcasting, request building, frame slicing."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import numpy as np

from asr_client.audio import AudioLike, PreparedAudio, RawAudio, load_audio, to_pcm
from qwenasr.v1 import asr_pb2 as pb

DEFAULT_TARGET = "localhost:50051"
# Audio up to this size goes in one Transcribe message; larger audio over TranscribeStream in pieces.
DEFAULT_STREAM_THRESHOLD_BYTES = 4 * 1024 * 1024
STREAM_PIECE_BYTES = 1024 * 1024
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
# Live streams: frames at 16 kHz LINEAR16 mono unless the caller says otherwise.
DEFAULT_LIVE_FORMAT = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16_000, channel_count=1)

ChannelMode = Literal["downmix", "separate"]
_CHANNEL_MODES = {"downmix": pb.CHANNEL_MODE_DOWNMIX, "separate": pb.CHANNEL_MODE_SEPARATE}

# gRPC's own retries (gRFC A6), set through the channel's default service config: a call that fails UNAVAILABLE (a
# server restarting, a connection refused) or RESOURCE_EXHAUSTED (a full queue) is sent again, at most 4 attempts
# in all, after exponential, jittered backoff 0.2 s, 0.4 s, 0.8 s (at most 2 s). gRPC does this below the client,
# before any response arrived, so it never repeats a call whose answer was already delivered. A server that knows
# retrying cannot help (audio over a limit) says so with the `grpc-retry-pushback-ms: -1` trailer, which stops the
# retries; a server's wanted delay in that trailer replaces the backoff. StreamingRecognize is not retried: a live
# stream's audio cannot be replayed by gRPC; open a new stream instead. `retries=False` on the clients turns it off.
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 4,
    "initialBackoff": "0.2s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
}
_RETRIED_METHODS = ("Transcribe", "TranscribeStream", "Align", "GetServerInfo")
SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [{"service": "qwenasr.v1.AsrService", "method": m} for m in _RETRIED_METHODS]
            + [{"service": "grpc.health.v1.Health", "method": "Check"}],
            "retryPolicy": RETRY_POLICY,
        }
    ]
}


def channel_options(extra: Sequence[tuple[str, Any]] = (), *, retries: bool = True) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
    if retries:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(SERVICE_CONFIG))]
    else:
        options.append(("grpc.enable_retries", 0))
    return [*options, *extra]


def channel_mode_pb(channel_mode: str) -> pb.ChannelMode.ValueType:
    if channel_mode not in _CHANNEL_MODES:
        raise ValueError(f"channel_mode must be one of {', '.join(_CHANNEL_MODES)}; got {channel_mode!r}")
    return _CHANNEL_MODES[channel_mode]


def auth_metadata(auth_token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {auth_token}"),) if auth_token else ()


def broadcast(name: str, value: object, n: int) -> list[Any]:
    """A scalar or a one-item list applies to every audio; otherwise the list must match the batch."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1 and n > 1:
        values = values * n
    if len(values) != n:
        raise ValueError(f"batch size mismatch: {n} audio inputs but {len(values)} values for {name}")
    return values


@dataclass(frozen=True)
class Job:
    audio: PreparedAudio
    config: pb.RecognitionConfig


def audio_items(audio: AudioLike | Sequence[AudioLike]) -> list[AudioLike]:
    """The inputs of a batch: a list (or a tuple that is not one ``(array, rate)`` pair), else one input."""
    if isinstance(audio, list):
        return audio
    if isinstance(audio, tuple) and not (len(audio) == 2 and isinstance(audio[0], np.ndarray)):
        return list(audio)
    return [audio]  # type: ignore[list-item]


def plan_batch(
    audio: AudioLike | Sequence[AudioLike],
    context: str | Sequence[str],
    language: str | None | Sequence[str | None],
    return_time_stamps: bool,
    *,
    fetch_timeout_s: float,
    max_new_tokens: int = 0,
    channel_mode: str = "downmix",
    endpointing: pb.EndpointingConfig | None = None,
) -> list[Job]:
    """Checks the batch shape first (cheap ValueErrors), then loads every audio input."""
    mode = channel_mode_pb(channel_mode)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be 0 (the server default) or positive; got {max_new_tokens}")
    items = audio_items(audio)
    if not items:
        raise ValueError("no audio given")
    contexts: list[str] = broadcast("context", context, len(items))
    languages: list[str | None] = broadcast("language", language, len(items))
    jobs = []
    for item, ctx, lang in zip(items, contexts, languages, strict=True):
        separate = mode == pb.CHANNEL_MODE_SEPARATE
        prepared = load_audio(item, fetch_timeout_s=fetch_timeout_s, separate_channels=separate)
        config = pb.RecognitionConfig(
            audio_format=prepared.audio_format,
            language=(lang or "").strip(),
            context=ctx or "",
            return_word_timestamps=return_time_stamps,
            max_new_tokens=max_new_tokens,
            channel_mode=mode,
        )
        if endpointing is not None:
            config.endpointing.CopyFrom(endpointing)
            config.endpointing.SetInParent()  # an empty config still asks for endpointing, at server defaults
        jobs.append(Job(prepared, config))
    return jobs


def plan_alignments(
    audio: AudioLike | Sequence[AudioLike],
    text: str | Sequence[str],
    language: str | Sequence[str],
    *,
    fetch_timeout_s: float,
) -> list[pb.AlignRequest]:
    """One AlignRequest per audio input; `text` and `language` broadcast like `plan_batch`'s options."""
    items = audio_items(audio)
    if not items:
        raise ValueError("no audio given")
    texts: list[str] = broadcast("text", text, len(items))
    languages: list[str] = broadcast("language", language, len(items))
    requests = []
    for item, txt, lang in zip(items, texts, languages, strict=True):
        prepared = load_audio(item, fetch_timeout_s=fetch_timeout_s)
        requests.append(
            pb.AlignRequest(
                audio_format=prepared.audio_format, audio=prepared.data, text=txt, language=(lang or "").strip()
            )
        )
    return requests


Progress = Callable[[int], None]


def stream_upload(
    job: Job, piece_bytes: int = STREAM_PIECE_BYTES, progress: Progress | None = None
) -> Iterator[pb.TranscribeStreamRequest]:
    """The config, then the audio in pieces; `progress` is told each piece's size once gRPC has taken it."""
    yield pb.TranscribeStreamRequest(config=job.config)
    data = job.audio.data
    for start in range(0, len(data), piece_bytes):
        piece = data[start : start + piece_bytes]
        yield pb.TranscribeStreamRequest(audio=piece)
        if progress is not None:
            progress(len(piece))


def live_config(
    audio_format: pb.AudioFormat,
    *,
    language: str | None,
    context: str,
    return_time_stamps: bool,
    interim_results: bool,
    interim_interval_ms: int,
    single_utterance: bool,
    endpointing: pb.EndpointingConfig | None,
    max_new_tokens: int = 0,
    channel_mode: str = "downmix",
) -> pb.StreamingRecognizeRequest:
    config = pb.RecognitionConfig(
        audio_format=audio_format,
        language=(language or "").strip(),
        context=context,
        return_word_timestamps=return_time_stamps,
        endpointing=endpointing,
        max_new_tokens=max_new_tokens,
        channel_mode=channel_mode_pb(channel_mode),
    )
    return pb.StreamingRecognizeRequest(
        config=pb.StreamingRecognitionConfig(
            config=config,
            interim_results=interim_results,
            interim_interval_ms=interim_interval_ms,
            single_utterance=single_utterance,
        )
    )


def is_single_audio(audio: object) -> bool:
    """Whether a stream source is one piece of audio (path, URL, bytes, (array, rate)) rather than frames."""
    import os

    return isinstance(audio, (str, os.PathLike, bytes, bytearray, memoryview, tuple, RawAudio))


def pcm_frames(
    audio: AudioLike, frame_ms: int, *, fetch_timeout_s: float, separate_channels: bool = False
) -> tuple[pb.AudioFormat, Iterator[bytes]]:
    """A file, URL, raw audio or array as frames of `frame_ms` (the last may be shorter)."""
    loaded = load_audio(audio, fetch_timeout_s=fetch_timeout_s, separate_channels=separate_channels)
    pcm = to_pcm(loaded, separate_channels=separate_channels)
    fmt = pcm.audio_format
    sample_frame = pcm.bytes_per_second // fmt.sample_rate_hz  # bytes of one sample of every channel
    frame_size = max(sample_frame, pcm.bytes_per_second * frame_ms // 1000 // sample_frame * sample_frame)
    data = pcm.data
    return fmt, (data[i : i + frame_size] for i in range(0, len(data), frame_size))


def rpc_error(error: BaseException) -> grpc.RpcError | None:
    """The error as a gRPC status error (it carries code() and details()), else None."""
    return error if isinstance(error, grpc.RpcError) and hasattr(error, "code") else None
