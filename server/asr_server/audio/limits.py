"""Limit checks shared by one-shot decoding and stream assembly (LimitExceeded names the limit)."""

from __future__ import annotations

from asr_server.errors import LimitExceeded


def check_duration(frame_count: int, sample_rate_hz: int, max_audio_duration_s: int) -> None:
    """Refuse audio longer than max_audio_duration_s; compared in whole frames so no rounding can let it in."""
    if frame_count > max_audio_duration_s * sample_rate_hz:
        raise LimitExceeded(
            f"the audio is at least {frame_count / sample_rate_hz:.1f} s long; this server accepts at most "
            f"max_audio_duration_s={max_audio_duration_s} s per request or stream; split it and send the parts "
            f"separately"
        )


def check_message_bytes(byte_count: int, max_message_bytes: int) -> None:
    if byte_count > max_message_bytes:
        raise LimitExceeded(
            f"the request carries {byte_count} audio bytes; one message may carry at most "
            f"max_message_bytes={max_message_bytes}; send larger audio in pieces with TranscribeStream"
        )


def check_stream_bytes(byte_count: int, max_stream_bytes: int) -> None:
    if byte_count > max_stream_bytes:
        raise LimitExceeded(
            f"the stream has sent {byte_count} audio bytes; one stream may carry at most "
            f"max_stream_bytes={max_stream_bytes}; split the audio into several requests"
        )
