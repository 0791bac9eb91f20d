"""Caller audio (raw PCM, G.711 or an encoded file) to float32 at 16 kHz, per channel or downmixed.

Order of work, cheapest refusals first: byte limit, empty, whole frames, duration (from the byte count or the
file header), then decoding, then mixing (before resampling: one channel to resample instead of N), then
resampling (soxr HQ).
"""

from __future__ import annotations

from collections.abc import Callable

from asr_server.audio.budget import decoded_bytes
from asr_server.audio.decoded import DecodedAudio, Samples, empty_audio_error
from asr_server.audio.files import container_formats, decode_file
from asr_server.audio.formats import AudioFormat, AudioLimits, Encoding
from asr_server.audio.limits import check_duration, check_message_bytes
from asr_server.audio.mix import average_rows
from asr_server.audio.raw import Buffer, check_whole_frames, decode_raw_channels
from asr_server.audio.resample import resample_to_model_rate

__all__ = ["DecodedAudio", "Samples", "container_formats", "decode_audio", "decode_payload"]


def decode_audio(
    data: Buffer,
    fmt: AudioFormat,
    *,
    limits: AudioLimits,
    downmix: bool = False,
    reserve: Callable[[int], None] | None = None,
) -> DecodedAudio:
    """Decode the audio of one request message (checked against max_message_bytes first).

    With `downmix`, the channels are averaged at the source rate and `channels` holds one array.
    Raises InvalidInput (malformed) or LimitExceeded (over max_message_bytes or max_audio_duration_s, or what
    `reserve` refuses: the bytes of the 16 kHz result, reserved before decoding; audio/budget.py).
    """
    check_message_bytes(len(data), limits.max_message_bytes)
    return decode_payload(data, fmt, max_audio_duration_s=limits.max_audio_duration_s, downmix=downmix, reserve=reserve)


def decode_payload(
    data: Buffer,
    fmt: AudioFormat,
    *,
    max_audio_duration_s: int,
    downmix: bool = False,
    reserve: Callable[[int], None] | None = None,
) -> DecodedAudio:
    """Decode audio whose byte count was already checked against its own limit (a whole client stream)."""
    if fmt.encoding is Encoding.FILE:
        return decode_file(
            bytes(data), fmt, max_audio_duration_s=max_audio_duration_s, downmix=downmix, reserve=reserve
        )
    return _decode_raw(data, fmt, max_audio_duration_s=max_audio_duration_s, downmix=downmix, reserve=reserve)


def _decode_raw(
    data: Buffer,
    fmt: AudioFormat,
    *,
    max_audio_duration_s: int,
    downmix: bool,
    reserve: Callable[[int], None] | None,
) -> DecodedAudio:
    if len(data) == 0:
        raise empty_audio_error(0, fmt.sample_rate_hz)
    check_whole_frames(len(data), fmt)
    frame_count = len(data) // fmt.bytes_per_frame
    check_duration(frame_count, fmt.sample_rate_hz, max_audio_duration_s)
    mixing = downmix and fmt.channel_count > 1
    if reserve is not None:
        reserve(decoded_bytes(frame_count, fmt.sample_rate_hz, 1 if mixing else fmt.channel_count))
    channels = decode_raw_channels(data, fmt)
    sources = [average_rows(channels)] if mixing else list(channels)
    resampled = tuple(resample_to_model_rate(samples, fmt.sample_rate_hz) for samples in sources)
    if resampled[0].shape[0] == 0:
        raise empty_audio_error(frame_count, fmt.sample_rate_hz)
    return DecodedAudio(
        channels=resampled,
        source_sample_rate_hz=fmt.sample_rate_hz,
        source_channel_count=fmt.channel_count,
        source_frame_count=frame_count,
        downmixed=mixing,
    )
