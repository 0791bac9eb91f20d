"""Domain types for the layout of caller audio, and the limits that bound it.

The gRPC edge converts protobuf `AudioFormat` into `AudioFormat` here; constructing one validates it, so an
invalid format never travels past the edge.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from asr_server.errors import InvalidInput

# The rate the model's feature extractor expects; everything is resampled to it. The one sample-rate constant of
# the server: engines, streams and results all count 16 kHz samples.
MODEL_SAMPLE_RATE_HZ = 16_000


def samples_to_ms(samples: int) -> int:
    """16 kHz samples -> whole milliseconds, rounded down, as DecodedAudio.duration_ms is: no time in a result
    lies past the audio's end."""
    return samples * 1000 // MODEL_SAMPLE_RATE_HZ


def ms_to_samples(ms: int) -> int:
    return ms * MODEL_SAMPLE_RATE_HZ // 1000


# Raw encodings: the accepted rates cover telephony (8 kHz) to studio (48 kHz); the contract publishes them.
MIN_RAW_SAMPLE_RATE_HZ = 8_000
MAX_RAW_SAMPLE_RATE_HZ = 48_000
MAX_CHANNEL_COUNT = 8

# Encoded files: the same 8 kHz floor (below it speech loses formants the model relies on); the ceiling is the
# highest rate common audio hardware records, so any real recording passes while absurd headers do not.
MIN_FILE_SAMPLE_RATE_HZ = 8_000
MAX_FILE_SAMPLE_RATE_HZ = 384_000


class Encoding(enum.Enum):
    """How the audio bytes are laid out (mirrors the proto's AudioEncoding)."""

    FILE = "file"  # an encoded file (WAV, FLAC, OGG, MP3, ...) detected from its bytes
    LINEAR16 = "linear16"  # signed 16-bit little-endian PCM, channels interleaved
    FLOAT32 = "float32"  # IEEE-754 32-bit little-endian float PCM, channels interleaved
    MULAW = "mulaw"  # G.711 mu-law, one byte per sample
    ALAW = "alaw"  # G.711 A-law, one byte per sample

    @property
    def is_raw(self) -> bool:
        return self is not Encoding.FILE

    @property
    def bytes_per_sample(self) -> int:
        """Bytes of one sample of one channel; raw encodings only."""
        if self is Encoding.FILE:
            raise ValueError("an encoded file has no fixed sample size")
        return _BYTES_PER_SAMPLE[self]


_BYTES_PER_SAMPLE = {Encoding.LINEAR16: 2, Encoding.FLOAT32: 4, Encoding.MULAW: 1, Encoding.ALAW: 1}

RAW_ENCODINGS: tuple[Encoding, ...] = (Encoding.LINEAR16, Encoding.FLOAT32, Encoding.MULAW, Encoding.ALAW)


@dataclass(frozen=True)
class AudioFormat:
    """The caller's audio layout. Construction validates it and raises InvalidInput when it is unusable.

    For `Encoding.FILE`, `sample_rate_hz` and `channel_count` are 0 (take the header's) or must equal the
    header's values; that comparison happens when the file is opened (see `check_file_header`).
    """

    encoding: Encoding
    sample_rate_hz: int
    channel_count: int

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        name = self.encoding.name
        if self.encoding.is_raw:
            if not MIN_RAW_SAMPLE_RATE_HZ <= self.sample_rate_hz <= MAX_RAW_SAMPLE_RATE_HZ:
                raise InvalidInput(
                    f"audio_format.sample_rate_hz {self.sample_rate_hz} is not accepted for {name}: raw audio "
                    f"needs {MIN_RAW_SAMPLE_RATE_HZ} to {MAX_RAW_SAMPLE_RATE_HZ} Hz"
                )
            if not 1 <= self.channel_count <= MAX_CHANNEL_COUNT:
                raise InvalidInput(
                    f"audio_format.channel_count {self.channel_count} is not accepted for {name}: raw audio "
                    f"needs 1 to {MAX_CHANNEL_COUNT} channels"
                )
            return
        if self.sample_rate_hz != 0 and not (MIN_FILE_SAMPLE_RATE_HZ <= self.sample_rate_hz <= MAX_FILE_SAMPLE_RATE_HZ):
            raise InvalidInput(
                f"audio_format.sample_rate_hz {self.sample_rate_hz} is not accepted for an encoded file: use 0 "
                f"(read it from the header) or the header's rate, {MIN_FILE_SAMPLE_RATE_HZ} to "
                f"{MAX_FILE_SAMPLE_RATE_HZ} Hz"
            )
        if self.channel_count != 0 and not 1 <= self.channel_count <= MAX_CHANNEL_COUNT:
            raise InvalidInput(
                f"audio_format.channel_count {self.channel_count} is not accepted for an encoded file: use 0 "
                f"(read it from the header) or the header's count, 1 to {MAX_CHANNEL_COUNT}"
            )

    @property
    def bytes_per_frame(self) -> int:
        """Bytes of one frame (one sample of every channel); raw encodings only."""
        return self.encoding.bytes_per_sample * self.channel_count

    def check_file_header(self, *, header_sample_rate_hz: int, header_channel_count: int, kind: str) -> None:
        """Check an opened file's header against this format (FILE only); `kind` names the file type."""
        if not MIN_FILE_SAMPLE_RATE_HZ <= header_sample_rate_hz <= MAX_FILE_SAMPLE_RATE_HZ:
            raise InvalidInput(
                f"the {kind} file's sample rate is {header_sample_rate_hz} Hz; encoded files need "
                f"{MIN_FILE_SAMPLE_RATE_HZ} to {MAX_FILE_SAMPLE_RATE_HZ} Hz"
            )
        if not 1 <= header_channel_count <= MAX_CHANNEL_COUNT:
            raise InvalidInput(
                f"the {kind} file has {header_channel_count} channels; at most {MAX_CHANNEL_COUNT} are accepted"
            )
        if self.sample_rate_hz not in (0, header_sample_rate_hz):
            raise InvalidInput(
                f"audio_format.sample_rate_hz is {self.sample_rate_hz} but the {kind} file's header says "
                f"{header_sample_rate_hz} Hz; set it to 0 or {header_sample_rate_hz}"
            )
        if self.channel_count not in (0, header_channel_count):
            raise InvalidInput(
                f"audio_format.channel_count is {self.channel_count} but the {kind} file's header says "
                f"{header_channel_count} channels; set it to 0 or {header_channel_count}"
            )


@dataclass(frozen=True)
class AudioLimits:
    """Server limits on one request's audio (published in ServerLimits)."""

    max_audio_duration_s: int
    max_message_bytes: int
    max_stream_bytes: int

    def __post_init__(self) -> None:
        # These come from server configuration, not from callers: a bad value is a programming error.
        for name in ("max_audio_duration_s", "max_message_bytes", "max_stream_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"AudioLimits.{name} must be positive, got {getattr(self, name)}")
