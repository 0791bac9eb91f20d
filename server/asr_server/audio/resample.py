"""Band-limited resampling to the model's 16 kHz with libsoxr.

Quality 'HQ' (20-bit precision, linear phase, pass band to about 0.91 of Nyquist): it is what the reference
library uses (librosa's default `soxr_hq`), its error floor (about -120 dB) is far below both 16-bit input
(-96 dB) and what a log-mel front end resolves, and it is 1.2-1.5x faster than 'VHQ' (28-bit; measured on one
core: 44.1 kHz 6,400 vs 4,400 audio-s per s, 48 kHz 7,000 vs 5,500, 8 kHz 21,500 vs 18,600).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import soxr

from asr_server.audio.formats import MODEL_SAMPLE_RATE_HZ

SOXR_QUALITY = "HQ"


def resample_to_model_rate(samples: npt.NDArray[np.float32], source_sample_rate_hz: int) -> npt.NDArray[np.float32]:
    """One-shot resample of one channel (1-D float32) to 16 kHz; output length is round(n * 16000 / rate).
    Channels are resampled one by one: soxr on interleaved channels plus the transpose back costs ~2x more."""
    if source_sample_rate_hz == MODEL_SAMPLE_RATE_HZ:
        return samples
    out: npt.NDArray[np.float32] = soxr.resample(
        samples, source_sample_rate_hz, MODEL_SAMPLE_RATE_HZ, quality=SOXR_QUALITY
    )
    return out


class StreamResampler:
    """Incremental resampling of (channels, n) float32 blocks to 16 kHz, one soxr stream per channel.

    The concatenation of every `process` output and the final `flush` equals the one-shot
    `resample_to_model_rate` of the whole signal (bit-identical with soxr 1.1; tests allow 1e-6). Output lags
    input by the filter's look-ahead plus soxr's internal blocking: up to about 100 ms at 8 kHz and about 30 ms
    at 44.1/48 kHz; output sample k is always at time k / 16000 s from the stream's start.
    """

    def __init__(self, source_sample_rate_hz: int, channel_count: int) -> None:
        if channel_count < 1:
            raise ValueError(f"channel_count must be at least 1, got {channel_count}")
        self.source_sample_rate_hz = source_sample_rate_hz
        self.channel_count = channel_count
        self._passthrough = source_sample_rate_hz == MODEL_SAMPLE_RATE_HZ
        self._streams = [
            soxr.ResampleStream(source_sample_rate_hz, MODEL_SAMPLE_RATE_HZ, 1, dtype="float32", quality=SOXR_QUALITY)
            for _ in range(0 if self._passthrough else channel_count)
        ]
        self._flushed = False

    def process(self, frames: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Feed (channels, n) samples at the source rate; returns the (channels, m) 16 kHz samples now ready."""
        return self._run(frames, last=False)

    def flush(self) -> npt.NDArray[np.float32]:
        """End of input: returns the remaining (channels, m) samples. No call may follow."""
        return self._run(np.zeros((self.channel_count, 0), dtype=np.float32), last=True)

    def _run(self, frames: npt.NDArray[np.float32], *, last: bool) -> npt.NDArray[np.float32]:
        if self._flushed:
            raise RuntimeError("StreamResampler was already flushed")
        if frames.ndim != 2 or frames.shape[0] != self.channel_count:
            raise ValueError(f"expected shape ({self.channel_count}, n), got {frames.shape}")
        self._flushed = last
        if self._passthrough:
            # A copy: callers reuse their input buffers, and the output must not change under them.
            return np.array(frames, dtype=np.float32)
        outs = [
            stream.resample_chunk(np.ascontiguousarray(channel, dtype=np.float32), last=last)
            for stream, channel in zip(self._streams, frames, strict=True)
        ]
        return np.stack(outs)
