"""Raw (headerless) PCM bytes to float32 frames at the source rate."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from asr_server.audio.formats import AudioFormat, Encoding
from asr_server.audio.g711 import ALAW_TO_FLOAT32, MULAW_TO_FLOAT32
from asr_server.errors import InvalidInput

# Integer PCM maps its full-scale value to 1.0 (libsndfile's convention), never a peak normalisation: the
# model was trained on levels as recorded and the native transformers path does not rescale either.
_INT16_FULL_SCALE = np.float32(1.0 / 32768.0)

Buffer = bytes | bytearray | memoryview


def check_whole_frames(byte_count: int, fmt: AudioFormat) -> None:
    """Refuse a raw byte count that ends inside a frame."""
    frame_bytes = fmt.bytes_per_frame
    extra_bytes = byte_count % frame_bytes
    if extra_bytes:
        raise InvalidInput(
            f"{fmt.encoding.name} audio with {fmt.channel_count} channel(s) must be a whole number of frames of "
            f"{frame_bytes} bytes ({fmt.channel_count} x {fmt.encoding.bytes_per_sample} bytes); got "
            f"{byte_count} bytes, {extra_bytes} byte(s) past the last whole frame"
        )


def decode_raw_channels(data: Buffer, fmt: AudioFormat) -> npt.NDArray[np.float32]:
    """Decode whole frames of raw audio to float32 of shape (channels, frames), C-contiguous, at the source rate.

    Channels are de-interleaved while converting (one strided gather per channel), so each channel comes out
    contiguous without a separate transpose pass. Raises InvalidInput for a partial trailing frame or for
    NaN/Inf or an out-of-range sample in FLOAT32 audio.
    """
    check_whole_frames(len(data), fmt)
    encoding = fmt.encoding
    channel_count = fmt.channel_count
    out = np.empty((channel_count, len(data) // fmt.bytes_per_frame), dtype=np.float32)
    if encoding in (Encoding.MULAW, Encoding.ALAW):
        codes = np.frombuffer(data, dtype=np.uint8)
        table = MULAW_TO_FLOAT32 if encoding is Encoding.MULAW else ALAW_TO_FLOAT32
        for channel in range(channel_count):
            np.take(table, codes[channel::channel_count], out=out[channel])
        return out
    if encoding is Encoding.LINEAR16:
        pcm = np.frombuffer(data, dtype="<i2")
        for channel in range(channel_count):
            out[channel] = pcm[channel::channel_count]
        out *= _INT16_FULL_SCALE
        return out
    if encoding is Encoding.FLOAT32:
        floats = np.frombuffer(data, dtype="<f4")
        for channel in range(channel_count):
            out[channel] = floats[channel::channel_count]
        check_sample_values(out, what="FLOAT32 audio")
        return out
    raise ValueError(f"{encoding.name} is not a raw encoding")


# Float samples beyond this are refused: full scale is +-1.0, so this leaves 60 dB of headroom for hot or
# unnormalised audio (kept, not clipped, as transformers' feature extractor takes it) while staying orders of
# magnitude below where the log-mel's power spectrum overflows float32 (|x| near 1e16: a 1e30 sample turned every
# feature of its clip into NaN).
MAX_FLOAT_SAMPLE_MAGNITUDE = 1000.0


def check_sample_values(channels: npt.NDArray[np.float32], *, what: str, first_frame: int = 0) -> None:
    """NaN, Inf or a sample beyond MAX_FLOAT_SAMPLE_MAGNITUDE would poison every feature frame it touches;
    refuse them, saying where the first one is.

    `channels` has shape (channels, frames); `first_frame` is the stream position of its first frame.
    """
    if channels.size == 0:
        return
    # One pass for the common case: finite and in range has a finite, small peak (NaN makes the max NaN).
    peak = float(np.max(np.abs(channels)))
    if peak <= MAX_FLOAT_SAMPLE_MAGNITUDE:
        return
    finite = np.isfinite(channels)
    if not finite.all():
        channel, frame = np.unravel_index(int(np.argmin(finite)), finite.shape)
        raise InvalidInput(
            f"{what} contains NaN or Inf (first at frame {first_frame + int(frame)} of channel {int(channel)}, "
            f"value {channels[channel, frame]!r}); only finite values, nominally in [-1, 1], are accepted"
        )
    channel, frame = np.unravel_index(int(np.argmax(np.abs(channels) > MAX_FLOAT_SAMPLE_MAGNITUDE)), channels.shape)
    raise InvalidInput(
        f"{what} has a sample of {float(channels[channel, frame]):g} (first at frame {first_frame + int(frame)} of "
        f"channel {int(channel)}); samples must lie within +-{MAX_FLOAT_SAMPLE_MAGNITUDE:g} (full scale is +-1.0): "
        "scale the audio to [-1, 1]"
    )
