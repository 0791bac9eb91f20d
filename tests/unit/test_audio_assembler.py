"""StreamAssembler and StreamResampler: pieces of any size give exactly what one-shot decoding gives."""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
import pytest
import soundfile

from asr_server.audio.assembler import StreamAssembler, StreamResampler
from asr_server.audio.decode import decode_audio, decode_payload
from asr_server.audio.formats import AudioFormat, AudioLimits, Encoding
from asr_server.audio.g711 import mulaw_encode
from asr_server.audio.raw import decode_raw_channels
from asr_server.audio.resample import resample_to_model_rate
from asr_server.errors import InvalidInput, LimitExceeded

LIMITS = AudioLimits(max_audio_duration_s=60, max_message_bytes=10_000_000, max_stream_bytes=100_000_000)
# Incremental and one-shot soxr output are bit-identical with soxr 1.1; allow float32 rounding anyway.
STREAM_RESAMPLE_ATOL = 1e-6


def random_bytes_for(fmt: AudioFormat, seconds: float, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    frames = round(fmt.sample_rate_hz * seconds)
    x = 0.3 * rng.standard_normal((frames, fmt.channel_count))
    if fmt.encoding is Encoding.FLOAT32:
        return x.astype("<f4").tobytes()
    pcm = np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16)
    if fmt.encoding is Encoding.LINEAR16:
        return pcm.astype("<i2").tobytes()
    return mulaw_encode(pcm).tobytes()


def split_randomly(data: bytes, rng: np.random.Generator, max_piece: int) -> list[bytes]:
    pieces = []
    position = 0
    while position < len(data):
        size = int(rng.integers(1, max_piece + 1))
        pieces.append(data[position : position + size])
        position += size
    return pieces


def assert_same_audio(actual: object, expected: object) -> None:
    for name in ("source_sample_rate_hz", "source_channel_count", "source_frame_count", "downmixed"):
        assert getattr(actual, name) == getattr(expected, name), name
    actual_channels = actual.channels  # type: ignore[attr-defined]
    expected_channels = expected.channels  # type: ignore[attr-defined]
    assert len(actual_channels) == len(expected_channels)
    for a, e in zip(actual_channels, expected_channels, strict=True):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize(
    "fmt",
    [
        AudioFormat(Encoding.LINEAR16, 16000, 1),
        AudioFormat(Encoding.LINEAR16, 48000, 2),
        AudioFormat(Encoding.FLOAT32, 44100, 2),
        AudioFormat(Encoding.MULAW, 8000, 2),
        AudioFormat(Encoding.ALAW, 8000, 1),
    ],
)
@pytest.mark.parametrize("max_piece", [1, 7, 1000])
def test_random_pieces_equal_one_shot_decoding(fmt: AudioFormat, max_piece: int) -> None:
    data = random_bytes_for(fmt, seconds=0.05 if max_piece == 1 else 0.5)
    assembler = StreamAssembler(fmt, limits=LIMITS)
    for piece in split_randomly(data, np.random.default_rng(max_piece), max_piece):
        assembler.append(piece)
    assert assembler.received_bytes == len(data)
    for downmix in (False, True):
        expected = decode_payload(data, fmt, max_audio_duration_s=60, downmix=downmix)
        again = StreamAssembler(fmt, limits=LIMITS)
        for piece in split_randomly(data, np.random.default_rng(max_piece), max_piece):
            again.append(piece)
        assert_same_audio(again.finish(downmix=downmix), expected)
    assert_same_audio(assembler.finish(), decode_audio(data, fmt, limits=LIMITS))


@pytest.mark.parametrize("piece_bytes", [320, 160, 161])
def test_stereo_mulaw_telephony_frames(piece_bytes: int) -> None:
    # 20 ms of 8 kHz stereo mu-law is 160 bytes per channel, 320 interleaved; 161 splits frames.
    fmt = AudioFormat(Encoding.MULAW, 8000, 2)
    data = random_bytes_for(fmt, seconds=1.0)
    assembler = StreamAssembler(fmt, limits=LIMITS)
    taken = []
    for start in range(0, len(data), piece_bytes):
        assembler.append(data[start : start + piece_bytes])
        frames = assembler.take_frames()
        if frames is not None:
            taken.append(frames)
    assert assembler.received_ms == 1000
    np.testing.assert_array_equal(np.concatenate(taken, axis=1), decode_raw_channels(data, fmt))
    assert_same_audio(assembler.finish(), decode_audio(data, fmt, limits=LIMITS))


def test_take_frames_holds_a_split_frame_until_complete() -> None:
    fmt = AudioFormat(Encoding.LINEAR16, 16000, 2)
    assembler = StreamAssembler(fmt, limits=LIMITS)
    frame = np.array([1000, -2000], dtype="<i2").tobytes()
    assert assembler.take_frames() is None
    assembler.append(frame[:3])
    assert assembler.take_frames() is None
    assembler.append(frame[3:] + frame[:1])
    got = assembler.take_frames()
    assert got is not None and got.shape == (2, 1) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got[:, 0], np.array([1000, -2000], np.float32) / 32768)
    assert assembler.take_frames() is None
    assembler.append(frame[1:])
    got = assembler.take_frames()
    assert got is not None and got.shape == (2, 1)


def test_live_mode_releases_consumed_bytes_and_refuses_finish() -> None:
    fmt = AudioFormat(Encoding.LINEAR16, 16000, 1)
    assembler = StreamAssembler(fmt, limits=LIMITS, keep_for_finish=False)
    for _ in range(100):
        assembler.append(b"\x01\x00" * 160 + b"\x01")
        assert assembler.take_frames() is not None
        assert assembler._pending_bytes <= 1  # only a split sample is ever held
    assert assembler.received_bytes == 100 * 321
    with pytest.raises(RuntimeError):
        assembler.finish()


def test_live_pipeline_equals_one_shot_resampling() -> None:
    fmt = AudioFormat(Encoding.MULAW, 8000, 2)
    data = random_bytes_for(fmt, seconds=2.0, seed=3)
    assembler = StreamAssembler(fmt, limits=LIMITS, keep_for_finish=False)
    resampler = StreamResampler(fmt.sample_rate_hz, fmt.channel_count)
    outputs = []
    for piece in split_randomly(data, np.random.default_rng(5), 700):
        assembler.append(piece)
        frames = assembler.take_frames()
        if frames is not None:
            outputs.append(resampler.process(frames))
    outputs.append(resampler.flush())
    live = np.concatenate(outputs, axis=1)
    one_shot = decode_audio(data, fmt, limits=LIMITS)
    assert live.shape == (2, one_shot.sample_count_16k)
    for c in range(2):
        np.testing.assert_allclose(live[c], one_shot.channels[c], rtol=0, atol=STREAM_RESAMPLE_ATOL)


@pytest.mark.parametrize("rate_hz", [8000, 16000, 22050, 44100, 48000])
def test_stream_resampler_equals_one_shot(rate_hz: int) -> None:
    rng = np.random.default_rng(rate_hz)
    x = (0.3 * rng.standard_normal((2, rate_hz))).astype(np.float32)
    resampler = StreamResampler(rate_hz, 2)
    outputs = []
    position = 0
    while position < x.shape[1]:
        size = int(rng.choice([1, 2, 160, 441, 4096]))
        block = x[:, position : position + size].copy()
        outputs.append(resampler.process(block))
        block[:] = 99.0  # callers may reuse their buffers
        position += size
    outputs.append(resampler.flush())
    incremental = np.concatenate(outputs, axis=1)
    one_shot = resample_to_model_rate(np.ascontiguousarray(x.T), rate_hz).T
    assert incremental.shape == one_shot.shape
    np.testing.assert_allclose(incremental, one_shot, rtol=0, atol=STREAM_RESAMPLE_ATOL)
    with pytest.raises(RuntimeError):
        resampler.process(x[:, :10])


def test_stream_resampler_checks_shape() -> None:
    with pytest.raises(ValueError, match=r"expected shape \(2, n\)"):
        StreamResampler(8000, 2).process(np.zeros((1, 10), np.float32))


def test_stream_bytes_limit_fails_at_the_crossing_piece() -> None:
    limits = AudioLimits(max_audio_duration_s=60, max_message_bytes=100, max_stream_bytes=1000)
    assembler = StreamAssembler(AudioFormat(Encoding.MULAW, 8000, 1), limits=limits)
    assembler.append(b"\xff" * 600)
    assembler.append(b"\xff" * 400)
    with pytest.raises(LimitExceeded, match="1001 audio bytes.*max_stream_bytes=1000"):
        assembler.append(b"\xff")
    assert assembler.received_bytes == 1000


def test_duration_limit_enforced_as_audio_arrives() -> None:
    limits = AudioLimits(max_audio_duration_s=2, max_message_bytes=100, max_stream_bytes=10**9)
    assembler = StreamAssembler(AudioFormat(Encoding.LINEAR16, 8000, 2), limits=limits)
    one_second = b"\x00" * (8000 * 4)
    assembler.append(one_second)
    assembler.append(one_second)
    with pytest.raises(LimitExceeded, match=r"max_audio_duration_s=2 s"):
        assembler.append(b"\x00" * 4)


def test_file_stream_is_decoded_at_finish() -> None:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((4410, 2)), 44100, format="FLAC")
    data = buffer.getvalue()
    fmt = AudioFormat(Encoding.FILE, 0, 0)
    assembler = StreamAssembler(fmt, limits=LIMITS)
    for piece in split_randomly(data, np.random.default_rng(0), 97):
        assembler.append(piece)
    assert assembler.received_frames == 0
    with pytest.raises(InvalidInput, match="needs a raw encoding"):
        assembler.take_frames()
    assert_same_audio(assembler.finish(), decode_audio(data, fmt, limits=LIMITS))


def test_file_stream_over_duration_fails_at_finish() -> None:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(8000 * 3), 8000, format="FLAC")
    limits = AudioLimits(max_audio_duration_s=2, max_message_bytes=100, max_stream_bytes=10**9)
    assembler = StreamAssembler(AudioFormat(Encoding.FILE, 0, 0), limits=limits)
    assembler.append(buffer.getvalue())
    with pytest.raises(LimitExceeded, match="max_audio_duration_s=2"):
        assembler.finish()


def test_partial_last_frame_and_empty_stream_are_refused() -> None:
    fmt = AudioFormat(Encoding.LINEAR16, 16000, 1)
    assembler = StreamAssembler(fmt, limits=LIMITS)
    assembler.append(b"\x00\x00\x00")
    with pytest.raises(InvalidInput, match="1 byte"):
        assembler.finish()
    with pytest.raises(InvalidInput, match="empty"):
        StreamAssembler(fmt, limits=LIMITS).finish()


def test_non_finite_float32_is_refused_by_take_frames() -> None:
    fmt = AudioFormat(Encoding.FLOAT32, 16000, 1)
    assembler = StreamAssembler(fmt, limits=LIMITS)
    assembler.append(np.array([0.0, np.nan], dtype="<f4").tobytes())
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        assembler.take_frames()


def test_finish_twice_and_append_after_finish_are_programming_errors() -> None:
    assembler = StreamAssembler(AudioFormat(Encoding.MULAW, 8000, 1), limits=LIMITS)
    assembler.append(b"\xff" * 80)
    assembler.finish()
    with pytest.raises(RuntimeError):
        assembler.finish()
    with pytest.raises(RuntimeError):
        assembler.append(b"\xff")


def test_mutable_pieces_are_copied() -> None:
    fmt = AudioFormat(Encoding.LINEAR16, 16000, 1)
    assembler = StreamAssembler(fmt, limits=LIMITS)
    piece = bytearray(b"\x10\x00" * 8)
    assembler.append(piece)
    piece[:] = b"\x00" * 16
    samples: npt.NDArray[np.float32] = assembler.finish().channels[0]
    np.testing.assert_array_equal(samples, np.full(8, 16 / 32768, np.float32))


def test_many_tiny_pieces_are_linear_time() -> None:
    fmt = AudioFormat(Encoding.MULAW, 8000, 1)
    assembler = StreamAssembler(fmt, limits=LIMITS)
    for _ in range(100_000):
        assembler.append(b"\xff")
    assert assembler.finish().duration_ms == 12_500
