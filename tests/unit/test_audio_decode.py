"""decode_audio: every raw encoding and rate against an analytic reference, file round trips, and every
malformed input.

Reference: the test signals are analytic (tones, a linear chirp), so the expected 16 kHz output is the same
formula evaluated at 16 kHz sample times, in float64, independent of soxr. Compared away from the edges (50 ms),
where a band-limited resampler must fade in/out. Tolerances (SNR of the error against the reference):
  FLOAT32 >= 100 dB, LINEAR16 >= 85 dB (16-bit quantisation at -8 dBFS), G.711 >= 30 dB (8-bit log quantisation),
and exact equality wherever no resampling happens (16 kHz input).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
import soundfile

from asr_server.audio import decode as decode_module
from asr_server.audio import files as files_module
from asr_server.audio.decode import container_formats, decode_audio, decode_payload
from asr_server.audio.formats import AudioFormat, AudioLimits, Encoding
from asr_server.audio.g711 import alaw_encode, mulaw_encode
from asr_server.errors import InvalidInput, LimitExceeded
from tests.unit.test_audio_g711 import sun_alaw2linear, sun_ulaw2linear

LIMITS = AudioLimits(max_audio_duration_s=60, max_message_bytes=10_000_000, max_stream_bytes=100_000_000)
FILE = AudioFormat(Encoding.FILE, 0, 0)
EDGE_16K = 800  # 50 ms at 16 kHz
MIN_SNR_DB = {Encoding.FLOAT32: 100.0, Encoding.LINEAR16: 85.0, Encoding.MULAW: 30.0, Encoding.ALAW: 30.0}

Signal = Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]


def tone_440(t: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return 0.4 * np.sin(2 * np.pi * 440.0 * t)


def chirp(t: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    # 200 Hz to 3400 Hz over one second: inside every rate's pass band, including 8 kHz telephony.
    return 0.3 * np.sin(2 * np.pi * (200.0 * t + 3200.0 * t * t / 2))


CHANNEL_SIGNALS: tuple[Signal, ...] = (tone_440, chirp)


def source(rate_hz: int, channels: int, seconds: float = 1.0) -> npt.NDArray[np.float64]:
    t = np.arange(round(rate_hz * seconds)) / rate_hz
    return np.stack([CHANNEL_SIGNALS[c](t) for c in range(channels)], axis=1)


def to_int16(x: npt.NDArray[np.float64]) -> npt.NDArray[np.int16]:
    return np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16)


def encode(x: npt.NDArray[np.float64], encoding: Encoding) -> bytes:
    """Interleave (frames, channels) into the raw encoding's bytes."""
    if encoding is Encoding.FLOAT32:
        return x.astype("<f4").tobytes()
    pcm = to_int16(x)
    if encoding is Encoding.LINEAR16:
        return pcm.astype("<i2").tobytes()
    if encoding is Encoding.MULAW:
        return mulaw_encode(pcm).tobytes()
    return alaw_encode(pcm).tobytes()


def reference_samples(data: bytes, encoding: Encoding, channels: int) -> npt.NDArray[np.float64]:
    """Independent decode of the raw bytes (Sun G.711 formulas, int/32768) to (channels, frames) float64."""
    if encoding is Encoding.FLOAT32:
        flat = np.frombuffer(data, "<f4").astype(np.float64)
    elif encoding is Encoding.LINEAR16:
        flat = np.frombuffer(data, "<i2") / 32768.0
    else:
        to_linear = sun_ulaw2linear if encoding is Encoding.MULAW else sun_alaw2linear
        table = np.array([to_linear(c) for c in range(256)], dtype=np.float64) / 32768.0
        flat = table[np.frombuffer(data, np.uint8)]
    return flat.reshape(-1, channels).T


def snr_db(actual: npt.NDArray[np.floating], expected: npt.NDArray[np.float64]) -> float:
    error = actual.astype(np.float64) - expected
    return float(10 * np.log10(np.sum(expected**2) / max(np.sum(error**2), 1e-300)))


@pytest.mark.parametrize("encoding", [Encoding.LINEAR16, Encoding.FLOAT32, Encoding.MULAW, Encoding.ALAW])
@pytest.mark.parametrize("rate_hz", [8000, 16000, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_raw_encoding_matches_analytic_reference(encoding: Encoding, rate_hz: int, channels: int) -> None:
    x = source(rate_hz, channels)
    audio = decode_audio(encode(x, encoding), AudioFormat(encoding, rate_hz, channels), limits=LIMITS)

    assert len(audio.channels) == channels
    assert audio.source_sample_rate_hz == rate_hz and audio.source_channel_count == channels
    assert audio.source_frame_count == rate_hz and audio.duration_ms == 1000
    assert audio.sample_count_16k == 16000
    t16 = np.arange(16000) / 16000
    interior = slice(EDGE_16K, 16000 - EDGE_16K)
    for c, samples in enumerate(audio.channels):
        assert samples.dtype == np.float32 and samples.flags.c_contiguous
        expected = CHANNEL_SIGNALS[c](t16)
        assert snr_db(samples[interior], expected[interior]) >= MIN_SNR_DB[encoding]


@pytest.mark.parametrize("encoding", [Encoding.LINEAR16, Encoding.FLOAT32, Encoding.MULAW, Encoding.ALAW])
@pytest.mark.parametrize("channels", [1, 2])
def test_16k_input_is_decoded_exactly(encoding: Encoding, channels: int) -> None:
    data = encode(source(16000, channels, seconds=0.25), encoding)
    audio = decode_audio(data, AudioFormat(encoding, 16000, channels), limits=LIMITS)
    expected = reference_samples(data, encoding, channels)
    for c in range(channels):
        np.testing.assert_array_equal(audio.channels[c], expected[c].astype(np.float32))


def test_integer_pcm_is_scaled_by_full_scale_not_peak_normalised() -> None:
    quiet = np.array([100, -100, 0, 327], dtype="<i2").tobytes()
    audio = decode_audio(quiet, AudioFormat(Encoding.LINEAR16, 16000, 1), limits=LIMITS)
    np.testing.assert_array_equal(audio.channels[0], np.array([100, -100, 0, 327], np.float32) / 32768)


def test_float32_out_of_range_values_are_kept_as_sent() -> None:
    loud = np.array([1.5, -2.0, 0.25], dtype="<f4").tobytes()
    audio = decode_audio(loud, AudioFormat(Encoding.FLOAT32, 16000, 1), limits=LIMITS)
    np.testing.assert_array_equal(audio.channels[0], [1.5, -2.0, 0.25])


@pytest.mark.parametrize("rate_hz", [8000, 44100])
def test_downmix_before_resampling_equals_average_after(rate_hz: int) -> None:
    data = encode(source(rate_hz, 2), Encoding.LINEAR16)
    fmt = AudioFormat(Encoding.LINEAR16, rate_hz, 2)
    separate = decode_audio(data, fmt, limits=LIMITS)
    mixed = decode_audio(data, fmt, limits=LIMITS, downmix=True)
    assert mixed.downmixed and len(mixed.channels) == 1 and mixed.source_channel_count == 2
    np.testing.assert_allclose(mixed.downmix(), separate.downmix(), atol=1e-6)
    t16 = np.arange(16000) / 16000
    interior = slice(EDGE_16K, 16000 - EDGE_16K)
    expected = (tone_440(t16) + chirp(t16)) / 2
    assert snr_db(mixed.channels[0][interior], expected[interior]) >= MIN_SNR_DB[Encoding.LINEAR16]


def test_mono_downmix_is_the_channel_itself() -> None:
    audio = decode_audio(
        encode(source(16000, 1), Encoding.LINEAR16),
        AudioFormat(Encoding.LINEAR16, 16000, 1),
        limits=LIMITS,
        downmix=True,
    )
    assert not audio.downmixed
    assert audio.downmix() is audio.channels[0]


# ---- encoded files -------------------------------------------------------------------------------------------


def write_file(x: npt.NDArray[np.float64], rate_hz: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, x, rate_hz, format=fmt, subtype=subtype)
    return buffer.getvalue()


def test_container_formats_lists_the_common_ones() -> None:
    formats = container_formats()
    for name in ("WAV", "FLAC", "OGG", "MP3"):
        assert name in formats
    assert "RAW" not in formats


@pytest.mark.parametrize("rate_hz", [8000, 16000, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize(("container", "subtype"), [("WAV", "PCM_16"), ("FLAC", "PCM_16")])
def test_lossless_file_equals_raw_linear16(rate_hz: int, channels: int, container: str, subtype: str) -> None:
    pcm = to_int16(source(rate_hz, channels))
    data = write_file(pcm.astype(np.float64) / 32768, rate_hz, container, subtype)
    from_file = decode_audio(data, FILE, limits=LIMITS)
    from_raw = decode_audio(
        pcm.astype("<i2").tobytes(), AudioFormat(Encoding.LINEAR16, rate_hz, channels), limits=LIMITS
    )
    assert (from_file.source_sample_rate_hz, from_file.source_channel_count) == (rate_hz, channels)
    assert from_file.source_frame_count == rate_hz
    for c in range(channels):
        # File path resamples block by block, raw path in one shot: identical with soxr 1.1, 1e-6 allowed.
        np.testing.assert_allclose(from_file.channels[c], from_raw.channels[c], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("subtype", "full_scale"), [("PCM_24", 2**23), ("PCM_32", 2**31), ("PCM_U8", 2**7)])
def test_wav_integer_subtypes_are_scaled_by_their_full_scale(subtype: str, full_scale: int) -> None:
    steps = np.array([-full_scale, -full_scale // 2, 0, full_scale // 4, full_scale - 1], dtype=np.int64)
    data = write_file(steps.astype(np.float64) / full_scale, 16000, "WAV", subtype)
    audio = decode_audio(data, FILE, limits=LIMITS)
    np.testing.assert_allclose(audio.channels[0], steps / full_scale, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    ("container", "subtype", "rate_hz", "min_snr_db"),
    [
        # Lossy codecs at libsndfile's default quality on a tone + chirp; measured 36-42 dB (Vorbis), 24-42 dB
        # (Opus) and 26-40 dB (MP3, lower at 16 kHz); the bounds leave room for codec library versions.
        ("OGG", "VORBIS", 44100, 25.0),
        ("OGG", "OPUS", 48000, 20.0),
        ("MP3", "MPEG_LAYER_III", 44100, 20.0),
        ("MP3", "MPEG_LAYER_III", 16000, 15.0),
    ],
)
def test_lossy_file_round_trip(container: str, subtype: str, rate_hz: int, min_snr_db: float) -> None:
    x = source(rate_hz, 2, seconds=2.0)
    data = write_file(x, rate_hz, container, subtype)
    audio = decode_audio(data, FILE, limits=LIMITS)
    assert audio.source_channel_count == 2
    assert abs(audio.duration_ms - 2000) <= 50  # codec padding is trimmed by the decoders
    n = audio.sample_count_16k
    t16 = np.arange(n) / 16000
    interior = slice(EDGE_16K, n - EDGE_16K)
    for c in range(2):
        assert snr_db(audio.channels[c][interior], CHANNEL_SIGNALS[c](t16)[interior]) >= min_snr_db


def test_mp3_read_in_blocks_equals_one_read() -> None:
    # Guards the no-seek reader: soundfile's default seek after each block corrupts MP3 decoding.
    x = source(44100, 1, seconds=3.0)
    data = write_file(x, 44100, "MP3")
    whole, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    sound = files_module._open(data)
    block = np.empty((1000, 1), dtype=np.float32)
    pieces = []
    while (got := sound.read(out=block)).shape[0]:
        pieces.append(got.copy())
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_file_rate_and_channels_must_match_format_when_given() -> None:
    data = write_file(source(16000, 2), 16000, "WAV", "PCM_16")
    decode_audio(data, AudioFormat(Encoding.FILE, 16000, 2), limits=LIMITS)
    with pytest.raises(InvalidInput, match="header says 16000 Hz; set it to 0 or 16000"):
        decode_audio(data, AudioFormat(Encoding.FILE, 8000, 0), limits=LIMITS)
    with pytest.raises(InvalidInput, match="header says 2 channels; set it to 0 or 2"):
        decode_audio(data, AudioFormat(Encoding.FILE, 0, 1), limits=LIMITS)


def test_file_with_too_many_channels() -> None:
    data = write_file(np.zeros((160, 9)), 16000, "WAV", "PCM_16")
    with pytest.raises(InvalidInput, match="9 channels; at most 8"):
        decode_audio(data, FILE, limits=LIMITS)


def test_file_with_unaccepted_rate() -> None:
    data = write_file(np.zeros(160), 4000, "WAV", "PCM_16")
    with pytest.raises(InvalidInput, match="4000 Hz; encoded files need 8000 to 384000 Hz"):
        decode_audio(data, FILE, limits=LIMITS)


# ---- malformed and over-limit input --------------------------------------------------------------------------


def wav_16k(seconds: float = 1.0) -> bytes:
    return write_file(source(16000, 1, seconds), 16000, "WAV", "PCM_16")


def with_wav_data_size(data: bytes, size: int) -> bytes:
    at = data.find(b"data")
    return data[: at + 4] + struct.pack("<I", size) + data[at + 8 :]


def test_truncated_wav_is_refused_with_both_lengths() -> None:
    data = wav_16k()
    with pytest.raises(InvalidInput, match=r"WAV file is truncated.*declares 32000 audio bytes but only 15978 follow"):
        decode_audio(data[: len(data) // 2], FILE, limits=LIMITS)


def test_wav_cut_inside_its_header() -> None:
    with pytest.raises(InvalidInput, match="ends inside its header"):
        decode_audio(wav_16k()[:30], FILE, limits=LIMITS)


def test_wav_header_claiming_more_audio_than_present() -> None:
    lying = with_wav_data_size(wav_16k(), 10 * 32000)
    with pytest.raises(InvalidInput, match="declares 320000 audio bytes but only 32000 follow"):
        decode_audio(lying, FILE, limits=LIMITS)


def test_wav_header_never_finalised() -> None:
    with pytest.raises(InvalidInput, match="declares 0 audio bytes but 32000 bytes follow.*never finalised"):
        decode_audio(with_wav_data_size(wav_16k(), 0), FILE, limits=LIMITS)


@pytest.mark.parametrize("placeholder", [0xFFFFFFFF, 0x7FFFF000])
def test_streaming_wav_size_placeholders_read_to_the_end(placeholder: int) -> None:
    audio = decode_audio(with_wav_data_size(wav_16k(), placeholder), FILE, limits=LIMITS)
    assert audio.source_frame_count == 16000


def test_wav_shorter_header_than_data_reads_declared_part() -> None:
    # Bytes after the declared data are other chunks or padding: legal, not audio.
    audio = decode_audio(with_wav_data_size(wav_16k(), 16000), FILE, limits=LIMITS)
    assert audio.source_frame_count == 8000


@pytest.mark.parametrize("container", ["AIFF", "AU"])
def test_truncated_aiff_and_au_are_refused(container: str) -> None:
    data = write_file(source(16000, 1), 16000, container, "PCM_16")
    with pytest.raises(InvalidInput, match=f"{container} file is truncated"):
        decode_audio(data[: len(data) // 2], FILE, limits=LIMITS)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
@pytest.mark.parametrize(("container", "subtype"), [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("OGG", "OPUS")])
def test_truncated_compressed_files_are_refused(container: str, subtype: str, fraction: float) -> None:
    data = write_file(source(48000, 1, seconds=2.0), 48000, container, subtype)
    with pytest.raises(InvalidInput, match=f"{container} (file|data).*(truncated|corrupt)"):
        decode_audio(data[: int(len(data) * fraction)], FILE, limits=LIMITS)


def test_ogg_cut_at_a_page_boundary_is_refused() -> None:
    data = write_file(source(48000, 1, seconds=2.0), 48000, "OGG", "OPUS")
    last_page = data.rfind(b"OggS")
    with pytest.raises(InvalidInput, match="OGG file is truncated: its audio stream has no end-of-stream page"):
        decode_audio(data[:last_page], FILE, limits=LIMITS)


def test_ogg_with_an_appended_tag_is_accepted() -> None:
    data = write_file(source(48000, 1), 48000, "OGG", "VORBIS")
    audio = decode_audio(data + b"TAG" + b"\x00" * 125, FILE, limits=LIMITS)
    assert audio.source_frame_count == 48000


def test_unreadable_format_lists_what_is_accepted() -> None:
    junk = np.random.default_rng(0).bytes(4000)
    with pytest.raises(
        InvalidInput,
        match=r"could not be read as an encoded file \(libsndfile: .+\); accepted "
        r"files: .*FLAC.*WAV.*set audio_format.encoding",
    ):
        decode_audio(junk, FILE, limits=LIMITS)


@pytest.mark.parametrize("fmt", [FILE, AudioFormat(Encoding.LINEAR16, 16000, 1), AudioFormat(Encoding.MULAW, 8000, 2)])
def test_empty_audio(fmt: AudioFormat) -> None:
    with pytest.raises(InvalidInput, match="empty"):
        decode_audio(b"", fmt, limits=LIMITS)


def test_empty_wav() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        decode_audio(write_file(np.zeros(0), 16000, "WAV", "PCM_16"), FILE, limits=LIMITS)


def test_audio_shorter_than_one_16k_sample() -> None:
    with pytest.raises(InvalidInput, match="too short.*1 frame"):
        decode_audio(b"\x00\x00", AudioFormat(Encoding.LINEAR16, 48000, 1), limits=LIMITS)


def test_odd_byte_count_linear16() -> None:
    with pytest.raises(InvalidInput, match=r"whole number of frames of 2 bytes.*got 1001 bytes, 1 byte\(s\) past"):
        decode_audio(b"\x00" * 1001, AudioFormat(Encoding.LINEAR16, 16000, 1), limits=LIMITS)


def test_partial_stereo_frame() -> None:
    with pytest.raises(InvalidInput, match=r"2 channel\(s\).*frames of 4 bytes \(2 x 2 bytes\); got 6 bytes"):
        decode_audio(b"\x00" * 6, AudioFormat(Encoding.LINEAR16, 16000, 2), limits=LIMITS)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float32_is_refused_with_position(bad: float) -> None:
    samples = np.zeros(100, dtype="<f4")
    samples[37] = bad
    with pytest.raises(InvalidInput, match=r"NaN or Inf \(first at frame 37 of channel 0"):
        decode_audio(samples.tobytes(), AudioFormat(Encoding.FLOAT32, 16000, 1), limits=LIMITS)


def test_non_finite_float_wav_is_refused() -> None:
    samples = np.zeros(100, dtype=np.float32)
    samples[5] = np.nan
    data = write_file(samples.astype(np.float64), 16000, "WAV", "FLOAT")
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        decode_audio(data, FILE, limits=LIMITS)


@pytest.mark.parametrize("peak", [1e30, -1e30, 1000.5, 3.0e38])
def test_float32_beyond_the_headroom_is_refused_with_position(peak: float) -> None:
    # 16,000 samples of 1e30 turned the whole log-mel into NaN and the model's output into "!" (issue: isolation).
    samples = np.full(16_000, 0.1, dtype="<f4")
    samples[4_321] = peak
    with pytest.raises(InvalidInput, match=r"first at frame 4321 of channel 0\); samples must lie within \+-1000"):
        decode_audio(samples.tobytes(), AudioFormat(Encoding.FLOAT32, 16000, 1), limits=LIMITS)


def test_hot_float32_within_the_headroom_is_kept_not_clipped() -> None:
    samples = np.full(16_000, 0.1, dtype="<f4")
    samples[10] = 1000.0
    samples[11] = -3.5
    decoded = decode_audio(samples.tobytes(), AudioFormat(Encoding.FLOAT32, 16000, 1), limits=LIMITS)
    assert decoded.channels[0][10] == 1000.0 and decoded.channels[0][11] == -3.5


def test_a_float_wav_beyond_the_headroom_is_refused() -> None:
    samples = np.zeros(100, dtype=np.float64)
    samples[7] = 1e20
    data = write_file(samples, 16000, "WAV", "DOUBLE")
    with pytest.raises(InvalidInput, match="the WAV file has a sample of 1e\\+20 \\(first at frame 7"):
        decode_audio(data, FILE, limits=LIMITS)


def test_raw_duration_over_limit_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_decode(*_: object) -> None:
        raise AssertionError("decoded audio that was over the limit")

    monkeypatch.setattr(decode_module, "decode_raw_channels", must_not_decode)
    over = b"\x00" * (8000 * 61)
    with pytest.raises(LimitExceeded, match=r"61.0 s long.*max_audio_duration_s=60 s") as raised:
        decode_audio(over, AudioFormat(Encoding.MULAW, 8000, 1), limits=LIMITS)
    assert not raised.value.retryable


def test_raw_duration_at_limit_is_accepted() -> None:
    audio = decode_audio(b"\xff" * (8000 * 60), AudioFormat(Encoding.MULAW, 8000, 1), limits=LIMITS)
    assert audio.duration_ms == 60_000


def test_file_duration_over_limit_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_resample(*_: object) -> None:
        raise AssertionError("decoded a file that was over the limit")

    monkeypatch.setattr(files_module, "StreamResampler", must_not_resample)
    data = write_file(np.zeros(8000 * 61), 8000, "FLAC", "PCM_16")
    with pytest.raises(LimitExceeded, match="max_audio_duration_s=60"):
        decode_audio(data, FILE, limits=LIMITS)


def test_message_bytes_over_limit() -> None:
    limits = AudioLimits(max_audio_duration_s=60, max_message_bytes=1000, max_stream_bytes=10_000)
    with pytest.raises(LimitExceeded, match="1001 audio bytes.*max_message_bytes=1000.*TranscribeStream"):
        decode_audio(b"\x00" * 1001, AudioFormat(Encoding.MULAW, 8000, 1), limits=limits)
    # decode_payload is for audio whose bytes were checked against another limit (a stream's).
    decode_payload(b"\x00" * 1001, AudioFormat(Encoding.MULAW, 8000, 1), max_audio_duration_s=60)
