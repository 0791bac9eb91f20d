"""Audio inputs as the reference `qwen_asr` library takes them, turned into request bytes and an AudioFormat.

Accepted (`AudioLike`):

* a local path (`str` or `os.PathLike`): the file's bytes, decoded by the server (WAV, FLAC, OGG, MP3, ...);
* an ``http://`` or ``https://`` URL: fetched by the client, then sent like a file;
* a ``data:audio/...;base64,...`` URL, or bare base64 of a file (as the reference: a string that is not an
  existing path and decodes as base64): its decoded bytes, sent like a file;
* raw `bytes` (or `bytearray` / `memoryview`): the bytes of an encoded audio file;
* `RawAudio(data, encoding, sample_rate_hz, channels)`: headerless PCM, G.711 mu-law or A-law (telephony files);
* a ``(numpy array, sample_rate)`` tuple, normalised on the client exactly as `qwen_asr` does
  (`normalize_audio_input`): any int or float dtype; 1-D is mono, 2-D is ``(frames, channels)`` or, when the first
  axis is at most 8 long and shorter than the second, ``(channels, frames)``; channels averaged to mono;
  resampled to 16 kHz with soxr HQ (librosa's default `soxr_hq`, which the reference calls), whatever the rate; then
  if the peak exceeds 1.0 the signal is divided by its peak (so int arrays, whose values are not scaled by their
  dtype, end up peak-normalised), and clipped to [-1, 1]. The rate may be an int or an integral float (16000.0).
  Sent as FLOAT32 16 kHz. With ``channel_mode="separate"`` every channel goes through the same steps on its own.

Encoded files are decoded (and resampled) by the server, which does not peak-normalise: the reference also divides
a file whose resampled peak exceeds 1.0 (a full-scale file's resampling overshoot) by that peak; the difference is
only that overshoot.
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

MODEL_SAMPLE_RATE_HZ = 16_000
MAX_CHANNELS = 8
_USER_AGENT = "qwen-asr-client"
_BYTES_PER_SAMPLE = {
    pb.AUDIO_ENCODING_LINEAR16: 2,
    pb.AUDIO_ENCODING_FLOAT32: 4,
    pb.AUDIO_ENCODING_MULAW: 1,
    pb.AUDIO_ENCODING_ALAW: 1,
}
ENCODINGS = {
    "linear16": pb.AUDIO_ENCODING_LINEAR16,
    "float32": pb.AUDIO_ENCODING_FLOAT32,
    "mulaw": pb.AUDIO_ENCODING_MULAW,
    "alaw": pb.AUDIO_ENCODING_ALAW,
}
# The reference takes a string for base64 when it has no path separator and is longer than this
# (`is_probably_base64`); shorter strings are paths.
_BASE64_MIN_CHARS = 256


@dataclass(frozen=True)
class RawAudio:
    """Headerless audio: `encoding` one of "linear16" (signed 16-bit little-endian), "float32", "mulaw", "alaw";
    channels interleaved. Sent as it is (the server checks the rate and channel count against its limits)."""

    data: bytes
    encoding: str
    sample_rate_hz: int
    channels: int = 1

    def audio_format(self) -> pb.AudioFormat:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown raw encoding {self.encoding!r}; accepted: {', '.join(ENCODINGS)}")
        if self.sample_rate_hz <= 0 or self.channels <= 0:
            raise ValueError("raw audio needs a positive sample rate and channel count")
        return pb.AudioFormat(
            encoding=ENCODINGS[self.encoding], sample_rate_hz=self.sample_rate_hz, channel_count=self.channels
        )


AudioLike = (
    str | os.PathLike[str] | bytes | bytearray | memoryview | RawAudio | tuple[npt.NDArray[Any], int | float]
)


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


_FORMS = "a path, an http(s) or data: URL, base64, bytes, RawAudio, or a (samples, sample_rate) tuple"


def load_audio(audio: AudioLike, *, fetch_timeout_s: float = 30.0, separate_channels: bool = False) -> PreparedAudio:
    """One audio input (see the module doc) as request bytes. Raises ValueError or OSError for bad input.

    `separate_channels`: arrays keep their channels (each normalised on its own) instead of being averaged."""
    file_format = pb.AudioFormat()
    if isinstance(audio, tuple):
        if len(audio) != 2:
            raise ValueError(f"an audio tuple must be (samples, sample_rate); got {len(audio)} items")
        samples, sample_rate = audio
        return array_audio(samples, sample_rate, separate_channels=separate_channels)
    if isinstance(audio, RawAudio):
        return PreparedAudio(bytes(audio.data), audio.audio_format(), "raw audio")
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
        if len(audio) > _BASE64_MIN_CHARS and not _is_file(audio):
            decoded = _bare_base64(audio)
            if decoded is not None:
                return PreparedAudio(decoded, file_format, "base64")
            raise ValueError(f"audio string of {len(audio)} characters is neither an existing file nor valid base64")
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio)
        if not _is_file(path):
            raise FileNotFoundError(f"no such audio file: {path}")
        return PreparedAudio(path.read_bytes(), file_format, f"file {path}")
    raise TypeError(f"unsupported audio input {type(audio).__name__}: pass {_FORMS}")


def _is_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a file; a string too long to be a path (base64) is not one, rather than an OSError."""
    try:
        return Path(path).is_file()
    except OSError:  # ENAMETOOLONG and the like: not a path at all
        return False


def _bare_base64(text: str) -> bytes | None:
    """The bytes of base64 without a data: prefix (standard or URL-safe alphabet, whitespace ignored), else None."""
    compact = "".join(text.split())
    for alphabet in (None, b"-_"):
        try:
            data = base64.b64decode(compact, altchars=alphabet, validate=True)
        except (binascii.Error, ValueError):
            continue
        if data:
            return data
    return None


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


def sample_rate_hz(sample_rate: object) -> int:
    """The rate as an int: an int, or a float with an integral value (the reference calls int() on it)."""
    if isinstance(sample_rate, (bool, np.bool_)):
        raise ValueError(f"the sample rate must be a positive number of hertz, got {sample_rate!r}")
    if isinstance(sample_rate, (int, np.integer)):
        rate = int(sample_rate)
    elif isinstance(sample_rate, (float, np.floating)) and float(sample_rate).is_integer():
        rate = int(sample_rate)
    else:
        raise ValueError(f"the sample rate must be a whole number of hertz (int, or a float such as 16000.0); "
                         f"got {sample_rate!r}")
    if rate <= 0:
        raise ValueError(f"the sample rate must be positive, got {sample_rate!r}")
    return rate


def reference_normalise(channel: npt.NDArray[Any], rate_hz: int) -> npt.NDArray[np.float32]:
    """One channel as `qwen_asr.inference.utils.normalize_audio_input` makes it: resampled to 16 kHz (soxr HQ,
    librosa's length ceil(n * 16000 / rate)), then divided by its peak when that exceeds 1.0, then clipped."""
    mono = channel
    if not np.issubdtype(mono.dtype, np.floating) or mono.dtype == np.float16:
        mono = mono.astype(np.float32)  # soxr takes float32/float64; the reference's int arrays reach here as floats
    if rate_hz != MODEL_SAMPLE_RATE_HZ:
        import soxr

        resampled = soxr.resample(mono, rate_hz, MODEL_SAMPLE_RATE_HZ, quality="HQ")
        length = int(np.ceil(mono.shape[0] * MODEL_SAMPLE_RATE_HZ / rate_hz))
        if resampled.shape[0] < length:
            resampled = np.pad(resampled, (0, length - resampled.shape[0]))
        mono = resampled[:length]
    out = mono.astype(np.float32)
    peak = float(np.max(np.abs(out))) if out.size else 0.0
    if peak > 1.0:
        out = out / peak
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def array_audio(samples: npt.NDArray[Any], sample_rate: object, *, separate_channels: bool = False) -> PreparedAudio:
    """A numpy array normalised as the reference does (see the module doc), as FLOAT32 16 kHz PCM."""
    rate = sample_rate_hz(sample_rate)
    array = np.asarray(samples)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"audio arrays must hold int or float samples; got {array.dtype}")
    if array.ndim == 1:
        frames_first = array[:, None]
    elif array.ndim == 2:
        # The reference's rule (to_mono): (channels, frames) when the first axis is at most 8 and the shorter.
        frames_first = array.T if array.shape[0] <= MAX_CHANNELS and array.shape[1] > array.shape[0] else array
    else:
        raise ValueError(f"audio arrays must be 1-D (mono) or 2-D (frames, channels); got shape {array.shape}")
    frames, channels = frames_first.shape
    if frames == 0:
        raise ValueError("the audio array is empty")
    if channels > MAX_CHANNELS:
        raise ValueError(f"at most {MAX_CHANNELS} channels; got an array of shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise ValueError("the audio array contains NaN or Inf")
    if separate_channels:
        columns = [reference_normalise(frames_first[:, c], rate) for c in range(channels)]
        out = np.stack(columns, axis=1)
    else:
        # As the reference: a 1-D array as it is, a 2-D one averaged (np.mean, cast to float32) before resampling.
        mono = array if array.ndim == 1 else np.mean(frames_first, axis=-1).astype(np.float32)
        out = reference_normalise(mono, rate)[:, None]
    fmt = pb.AudioFormat(
        encoding=pb.AUDIO_ENCODING_FLOAT32, sample_rate_hz=MODEL_SAMPLE_RATE_HZ, channel_count=out.shape[1]
    )
    return PreparedAudio(np.ascontiguousarray(out, dtype="<f4").tobytes(), fmt, "array")


def to_pcm(audio: PreparedAudio, *, separate_channels: bool = False) -> PreparedAudio:
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
    return array_audio(samples, int(sample_rate), separate_channels=separate_channels)


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
