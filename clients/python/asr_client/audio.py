"""Audio inputs as the reference `qwen_asr` library takes them, turned into request bytes and an AudioFormat.

Accepted (`AudioLike`):

* a local path (`str` or `os.PathLike`): the file's bytes, decoded by the server (WAV, FLAC, OGG, MP3, ...);
* an ``http://`` or ``https://`` URL: fetched by the client, then sent like a file;
* a ``data:audio/...;base64,...`` URL: its decoded bytes, sent like a file;
* raw `bytes` (or `bytearray` / `memoryview`): the bytes of an encoded audio file;
* a ``(numpy array, sample_rate)`` tuple: float samples in [-1, 1] are sent as raw FLOAT32 PCM, int16 samples as
  LINEAR16; 1-D is mono, 2-D is ``(frames, channels)`` or ``(channels, frames)`` with at most 8 channels.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.error
import urllib.parse
import urllib.request
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from qwenasr.v1 import asr_pb2 as pb

AudioLike = str | os.PathLike[str] | bytes | bytearray | memoryview | tuple[npt.NDArray[Any], int]

MAX_CHANNELS = 8
_USER_AGENT = "qwen-asr-client"
_BYTES_PER_SAMPLE = {
    pb.AUDIO_ENCODING_LINEAR16: 2,
    pb.AUDIO_ENCODING_FLOAT32: 4,
    pb.AUDIO_ENCODING_MULAW: 1,
    pb.AUDIO_ENCODING_ALAW: 1,
}


@dataclass(frozen=True)
class PreparedAudio:
    """Request-ready audio: the bytes and how they are laid out (encoding UNSPECIFIED: an encoded file)."""

    data: bytes
    audio_format: pb.AudioFormat
    source: str  # what it was made from, for error messages: "file x.wav", "URL ...", "bytes", "array"

    @property
    def is_raw(self) -> bool:
        return self.audio_format.encoding != pb.AUDIO_ENCODING_UNSPECIFIED

    @property
    def bytes_per_second(self) -> int:
        """Raw encodings only: how many bytes make one second of audio."""
        return bytes_per_second(self.audio_format)


def bytes_per_second(fmt: pb.AudioFormat) -> int:
    if fmt.encoding not in _BYTES_PER_SAMPLE:
        raise ValueError("only raw encodings (LINEAR16, FLOAT32, MULAW, ALAW) have a fixed byte rate")
    return _BYTES_PER_SAMPLE[fmt.encoding] * fmt.sample_rate_hz * max(fmt.channel_count, 1)


def load_audio(audio: AudioLike, *, fetch_timeout_s: float = 30.0) -> PreparedAudio:
    """One audio input (see the module doc) as request bytes. Raises ValueError or OSError for bad input."""
    file_format = pb.AudioFormat()
    if isinstance(audio, tuple):
        if len(audio) != 2:
            raise ValueError(f"an audio tuple must be (samples, sample_rate); got {len(audio)} items")
        samples, sample_rate = audio
        return array_audio(samples, sample_rate)
    if isinstance(audio, (bytes, bytearray, memoryview)):
        data = bytes(audio)
        if not data:
            raise ValueError("audio bytes are empty")
        return PreparedAudio(data, file_format, "bytes")
    if isinstance(audio, np.ndarray):
        raise ValueError("a numpy array needs its sample rate: pass (samples, sample_rate)")
    if isinstance(audio, str):
        scheme = audio.split(":", 1)[0].lower() if ":" in audio else ""
        if scheme == "data":
            return PreparedAudio(decode_data_url(audio), file_format, "data URL")
        if scheme in ("http", "https"):
            return PreparedAudio(fetch_url(audio, timeout_s=fetch_timeout_s), file_format, f"URL {audio}")
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio)
        if not path.is_file():
            raise FileNotFoundError(f"no such audio file: {path} (audio may be a path, an http(s) or data: URL, "
                                    "bytes, or a (samples, sample_rate) tuple)")
        return PreparedAudio(path.read_bytes(), file_format, f"file {path}")
    raise TypeError(
        f"unsupported audio input {type(audio).__name__}: pass a path, an http(s) or data: URL, bytes, "
        "or a (samples, sample_rate) tuple"
    )


def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:[<media type>];base64,<data>`` URL."""
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise ValueError("a data: URL must be base64-encoded: data:audio/wav;base64,<data>")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"the data: URL holds invalid base64: {exc}") from exc
    if not data:
        raise ValueError("the data: URL holds no audio")
    return data


def fetch_url(url: str, *, timeout_s: float) -> bytes:
    """GET an http(s) URL; raises ValueError with the URL and the reason when that fails."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - http(s) only
            data: bytes = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise ValueError(f"cannot fetch audio from {url}: {exc}") from exc
    if not data:
        raise ValueError(f"{url} returned no data")
    return data


def array_audio(samples: npt.NDArray[Any], sample_rate: int) -> PreparedAudio:
    """A numpy array as raw PCM: float as FLOAT32, int16 as LINEAR16, channels interleaved."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"the sample rate must be a positive int, got {sample_rate!r}")
    array = np.asarray(samples)
    if array.ndim == 1:
        array = array[:, None]
    elif array.ndim == 2:
        if array.shape[1] > MAX_CHANNELS and array.shape[0] <= MAX_CHANNELS:
            array = array.T  # (channels, frames), as torch and librosa lay it out
    else:
        raise ValueError(f"audio arrays must be 1-D (mono) or 2-D (frames, channels); got shape {array.shape}")
    frames, channels = array.shape
    if frames == 0:
        raise ValueError("the audio array is empty")
    if channels > MAX_CHANNELS:
        raise ValueError(f"at most {MAX_CHANNELS} channels; got an array of shape {np.shape(samples)}")
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype("<f4")
        if not np.all(np.isfinite(array)):
            raise ValueError("the audio array contains NaN or Inf")
        encoding = pb.AUDIO_ENCODING_FLOAT32
    elif array.dtype == np.int16:
        array = array.astype("<i2")
        encoding = pb.AUDIO_ENCODING_LINEAR16
    else:
        raise ValueError(f"audio arrays must be float (in [-1, 1]) or int16; got {array.dtype}")
    fmt = pb.AudioFormat(encoding=encoding, sample_rate_hz=int(sample_rate), channel_count=channels)
    return PreparedAudio(np.ascontiguousarray(array).tobytes(), fmt, "array")


def to_pcm(audio: PreparedAudio) -> PreparedAudio:
    """Raw PCM for live streaming: raw audio as it is; an encoded file decoded on the client.

    PCM WAV files need nothing more than the standard library; other formats need the optional `soundfile`.
    """
    if audio.is_raw:
        return audio
    try:
        with wave.open(io.BytesIO(audio.data)) as wav:
            if wav.getsampwidth() == 2:
                fmt = pb.AudioFormat(
                    encoding=pb.AUDIO_ENCODING_LINEAR16,
                    sample_rate_hz=wav.getframerate(),
                    channel_count=wav.getnchannels(),
                )
                return PreparedAudio(wav.readframes(wav.getnframes()), fmt, audio.source)
    except (wave.Error, EOFError):
        pass
    try:
        import soundfile
    except ImportError:  # pragma: no cover - depends on the environment
        raise ValueError(
            f"{audio.source}: only 16-bit PCM WAV is decoded without the optional soundfile package "
            "(pip install soundfile), or pass (samples, sample_rate)"
        ) from None
    try:
        samples, sample_rate = soundfile.read(io.BytesIO(audio.data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises its own error types
        raise ValueError(f"{audio.source}: cannot decode the audio: {exc}") from exc
    return array_audio(samples, int(sample_rate))


def frame_to_bytes(frame: bytes | bytearray | memoryview | npt.NDArray[Any], fmt: pb.AudioFormat) -> bytes:
    """One frame of a live source: bytes as they are, numpy arrays converted to the stream's encoding."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return bytes(frame)
    array = np.asarray(frame)
    if fmt.encoding == pb.AUDIO_ENCODING_FLOAT32:
        return array.astype("<f4").tobytes()
    if fmt.encoding == pb.AUDIO_ENCODING_LINEAR16:
        if np.issubdtype(array.dtype, np.floating):
            array = np.clip(np.round(array * 32767.0), -32768, 32767)
        return array.astype("<i2").tobytes()
    raise ValueError("numpy frames need a LINEAR16 or FLOAT32 audio_format; send MULAW/ALAW frames as bytes")
