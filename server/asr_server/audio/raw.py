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


def decode_raw_frames(data: Buffer, fmt: AudioFormat) -> npt.NDArray[np.float32]:
    """Decode whole frames of raw audio to float32, shape (frames, channels), at the source rate.

    Raises InvalidInput for a partial trailing frame or for NaN/Inf in FLOAT32 audio.
    """
    check_whole_frames(len(data), fmt)
    encoding = fmt.encoding
    if encoding is Encoding.LINEAR16:
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32)
        samples *= _INT16_FULL_SCALE
    elif encoding is Encoding.FLOAT32:
        samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
        check_finite(samples, what="FLOAT32 audio")
    elif encoding is Encoding.MULAW:
        samples = MULAW_TO_FLOAT32[np.frombuffer(data, dtype=np.uint8)]
    elif encoding is Encoding.ALAW:
        samples = ALAW_TO_FLOAT32[np.frombuffer(data, dtype=np.uint8)]
    else:
        raise ValueError(f"{encoding.name} is not a raw encoding")
    return samples.reshape(-1, fmt.channel_count)


def check_finite(samples: npt.NDArray[np.float32], *, what: str) -> None:
    """NaN or Inf would poison every feature frame they touch; refuse them with their position."""
    finite = np.isfinite(samples)
    if not finite.all():
        first_bad = int(np.argmin(finite.reshape(-1)))
        raise InvalidInput(
            f"{what} contains NaN or Inf (first at sample {first_bad}, value "
            f"{samples.reshape(-1)[first_bad]!r}); only finite values, nominally in [-1, 1], are accepted"
        )
