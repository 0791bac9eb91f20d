"""Encoded files (WAV, FLAC, OGG/Vorbis/Opus, MP3, ...) decoded with libsndfile from memory.

The file is decoded and resampled block by block into one buffer sized from the header, so peak memory is the
16 kHz result plus one block, however well the file compresses (a small FLAC of silence can expand to gigabytes at
its own rate). With a `reserve` callback (audio/budget.py) those bytes are reserved before the buffer is made, so an
over-budget file is refused before any decoding.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import soundfile

from asr_server.audio.budget import decoded_bytes
from asr_server.audio.decoded import DecodedAudio, empty_audio_error
from asr_server.audio.file_headers import check_declared_length
from asr_server.audio.formats import AudioFormat
from asr_server.audio.limits import check_duration
from asr_server.audio.mix import average_rows
from asr_server.audio.raw import check_sample_values
from asr_server.audio.resample import StreamResampler
from asr_server.errors import InvalidInput

_BLOCK_FRAMES = 1 << 16
# Room past the header's length in the output buffer: the resampler's rounding, an MP3 a little longer than its
# estimate. Longer audio grows the buffer (and its reservation) by a quarter at a time.
_SLACK_SAMPLES = 4096

# A header-less RAW "file" cannot be detected from its bytes; callers use the raw encodings for that.
_UNDETECTABLE_FORMATS = frozenset({"RAW"})

# MP3 has no authoritative length field: libsndfile's frame count is the Xing/Info header's (optional) or an
# estimate from the bitrate, so a short read is not proof of truncation. A truncated MP3 decodes to its whole frames.
_FORMATS_WITHOUT_EXACT_LENGTH = frozenset({"MP3"})


def container_formats() -> list[str]:
    """The file formats this server's libsndfile reads, as GetServerInfo lists them ("FLAC", "MP3", ...)."""
    return sorted(name for name in soundfile.available_formats() if name not in _UNDETECTABLE_FORMATS)


class _SeekSafeBytesIO(io.BytesIO):
    # libsndfile probes offsets past either end of malformed headers; BytesIO raises ValueError for a negative
    # one, and an exception inside soundfile's C callback is only printed. Answering with the unchanged position
    # makes libsndfile fail the seek and report the file as malformed, which is the truth.
    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            return super().seek(offset, whence)
        except ValueError:
            return self.tell()


class _SequentialSoundFile(soundfile.SoundFile):  # type: ignore[misc]
    # soundfile seeks to "position + frames read" after every read when the file is seekable. libsndfile's MP3
    # seek is approximate (mpg123 "fuzzy seeking"), so block-wise reads of an MP3 came back as garbage (SNR
    # near 0 dB with 1024-frame blocks). We only ever read forward, so we say the file cannot seek: no seeks
    # happen between reads, and Ogg files are spared a bisection search per block as well.
    def seekable(self) -> bool:
        return False


def _libsndfile_message(error: Exception) -> str:
    message = getattr(error, "error_string", None)
    return str(message if message else error).strip()


def _open(data: bytes) -> Any:
    try:
        return _SequentialSoundFile(_SeekSafeBytesIO(data))
    except soundfile.SoundFileError as error:
        raise InvalidInput(
            f"the audio bytes could not be read as an encoded file (libsndfile: {_libsndfile_message(error)}); "
            f"accepted files: {', '.join(container_formats())}; for headerless PCM set audio_format.encoding to "
            f"LINEAR16, FLOAT32, MULAW or ALAW with its sample_rate_hz and channel_count"
        ) from error


class _Output:
    """The growing (channels, n) 16 kHz result; every byte it allocates is reserved first."""

    def __init__(self, channels: int, expected_samples: int, reserve: Callable[[int], None] | None) -> None:
        self._reserve = reserve
        self._channels = channels
        self.filled = 0
        self.buffer = self._allocate(expected_samples + _SLACK_SAMPLES)

    def _allocate(self, samples: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        if self._reserve is not None:
            self._reserve(samples * self._channels * 4)
        return np.empty((self._channels, samples), dtype=np.float32)

    def put(self, piece: np.ndarray[Any, np.dtype[np.float32]]) -> None:
        count = piece.shape[1]
        if self.filled + count > self.buffer.shape[1]:
            grown = self._allocate(max(count, self.buffer.shape[1] // 4, _SLACK_SAMPLES))
            self.buffer = np.concatenate([self.buffer[:, : self.filled], grown], axis=1)
        self.buffer[:, self.filled : self.filled + count] = piece
        self.filled += count


def decode_file(
    data: bytes,
    fmt: AudioFormat,
    *,
    max_audio_duration_s: int,
    downmix: bool,
    reserve: Callable[[int], None] | None = None,
) -> DecodedAudio:
    """Decode an encoded file to 16 kHz float32. Raises InvalidInput or LimitExceeded (also from `reserve`)."""
    if not data:
        raise empty_audio_error(0, 0)
    check_declared_length(data)
    with _open(data) as sound:
        kind = str(sound.format)
        sample_rate_hz = int(sound.samplerate)
        channel_count = int(sound.channels)
        header_frames = int(sound.frames)
        fmt.check_file_header(header_sample_rate_hz=sample_rate_hz, header_channel_count=channel_count, kind=kind)
        # Cheap rejection from the header before any decoding work.
        check_duration(header_frames, sample_rate_hz, max_audio_duration_s)
        out_channels = 1 if downmix else channel_count
        # Sized (and reserved) from the header before decoding anything.
        expected = decoded_bytes(max(header_frames, 0), sample_rate_hz, 1) // 4
        output = _Output(out_channels, expected, reserve)
        resampler = StreamResampler(sample_rate_hz, out_channels)
        block = np.empty((_BLOCK_FRAMES, channel_count), dtype=np.float32)
        frames_read = 0
        while True:
            try:
                got = sound.read(out=block)
            except soundfile.SoundFileError as error:
                raise InvalidInput(
                    f"the {kind} data could not be decoded after {frames_read} of {header_frames} frames "
                    f"(libsndfile: {_libsndfile_message(error)}); the file is truncated or corrupt"
                ) from error
            if got.shape[0] == 0:
                break
            # The header's count may be an estimate (MP3): keep enforcing the limit on what really decodes.
            check_duration(frames_read + got.shape[0], sample_rate_hz, max_audio_duration_s)
            by_channel = np.ascontiguousarray(got.T)
            check_sample_values(by_channel, what=f"the {kind} file", first_frame=frames_read)
            frames_read += got.shape[0]
            if downmix and channel_count > 1:
                by_channel = average_rows(by_channel).reshape(1, -1)
            output.put(resampler.process(by_channel))
        output.put(resampler.flush())
    if frames_read < header_frames and kind not in _FORMATS_WITHOUT_EXACT_LENGTH:
        raise InvalidInput(
            f"the {kind} file is truncated: its header declares {header_frames} frames but only {frames_read} "
            f"could be decoded; send the complete file"
        )
    # Views into the one buffer: no second copy of hours of audio (its few slack samples stay allocated).
    resampled = output.buffer[:, : output.filled]
    if resampled.shape[1] == 0:
        raise empty_audio_error(frames_read, sample_rate_hz)
    return DecodedAudio(
        channels=tuple(resampled),
        source_sample_rate_hz=sample_rate_hz,
        source_channel_count=channel_count,
        source_frame_count=frames_read,
        downmixed=downmix and channel_count > 1,
    )
