"""The result of decoding: per-channel float32 audio at the model's 16 kHz."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from asr_server.audio.formats import MODEL_SAMPLE_RATE_HZ
from asr_server.audio.mix import average_rows
from asr_server.errors import InvalidInput

Samples = npt.NDArray[np.float32]


# eq=False: numpy arrays have no truth value, so generated __eq__ would raise; identity is what callers need.
@dataclass(frozen=True, eq=False)
class DecodedAudio:
    """Decoded audio. Arrays are owned by this value and must not be modified in place.

    `channels` holds one 1-D float32 array per channel at 16 kHz, all the same length; when decoding was asked
    to downmix, it holds a single array (the average of the source channels, taken before resampling) while
    `source_channel_count` still tells how many channels the caller sent.
    """

    channels: tuple[Samples, ...]
    source_sample_rate_hz: int
    source_channel_count: int
    source_frame_count: int
    downmixed: bool = False

    @property
    def duration_ms(self) -> int:
        """Length of the audio as received, at the source rate (results' times are measured the same way)."""
        return self.source_frame_count * 1000 // self.source_sample_rate_hz

    @property
    def sample_count_16k(self) -> int:
        return int(self.channels[0].shape[0])

    def downmix(self) -> Samples:
        """16 kHz mono: the channels' average (resampling is linear, so this equals mixing first, up to float
        rounding; ask decode_audio(downmix=True) to mix first and resample once)."""
        if len(self.channels) == 1:
            return self.channels[0]
        return average_rows(self.channels)


def empty_audio_error(frame_count: int, sample_rate_hz: int) -> InvalidInput:
    if frame_count == 0:
        return InvalidInput("the audio is empty (0 frames); send at least one frame of audio")
    return InvalidInput(
        f"the audio is too short to use: {frame_count} frame(s) at {sample_rate_hz} Hz is less than one sample "
        f"at {MODEL_SAMPLE_RATE_HZ} Hz"
    )
