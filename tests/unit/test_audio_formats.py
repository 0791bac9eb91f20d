import pytest

from asr_server.audio.formats import AudioFormat, AudioLimits, Encoding
from asr_server.errors import InvalidInput


@pytest.mark.parametrize("encoding", [Encoding.LINEAR16, Encoding.FLOAT32, Encoding.MULAW, Encoding.ALAW])
@pytest.mark.parametrize("rate_hz", [0, 7999, 48001, 1_000_000])
def test_raw_rate_out_of_range_names_the_range(encoding: Encoding, rate_hz: int) -> None:
    with pytest.raises(InvalidInput, match=rf"sample_rate_hz {rate_hz} .*8000 to 48000 Hz"):
        AudioFormat(encoding, rate_hz, 1)


@pytest.mark.parametrize("channels", [0, 9, -1])
def test_raw_channel_count_out_of_range_names_the_range(channels: int) -> None:
    with pytest.raises(InvalidInput, match=rf"channel_count {channels} .*1 to 8 channels"):
        AudioFormat(Encoding.LINEAR16, 16000, channels)


@pytest.mark.parametrize("rate_hz", [8000, 16000, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2, 8])
def test_raw_formats_in_range_are_accepted(rate_hz: int, channels: int) -> None:
    fmt = AudioFormat(Encoding.MULAW, rate_hz, channels)
    assert fmt.bytes_per_frame == channels


def test_bytes_per_frame() -> None:
    assert AudioFormat(Encoding.LINEAR16, 8000, 2).bytes_per_frame == 4
    assert AudioFormat(Encoding.FLOAT32, 8000, 3).bytes_per_frame == 12
    assert AudioFormat(Encoding.ALAW, 8000, 2).bytes_per_frame == 2
    with pytest.raises(ValueError):
        _ = AudioFormat(Encoding.FILE, 0, 0).bytes_per_frame


def test_file_format_takes_zero_or_plausible_values() -> None:
    AudioFormat(Encoding.FILE, 0, 0)
    AudioFormat(Encoding.FILE, 44100, 2)
    with pytest.raises(InvalidInput, match="encoded file.*0"):
        AudioFormat(Encoding.FILE, 1_000_000, 0)
    with pytest.raises(InvalidInput, match="encoded file.*1 to 8"):
        AudioFormat(Encoding.FILE, 0, 9)


def test_file_header_mismatch_says_what_to_send() -> None:
    fmt = AudioFormat(Encoding.FILE, 8000, 0)
    expected = "sample_rate_hz is 8000 but the WAV file's header says 16000 Hz; set it to 0 or 16000"
    with pytest.raises(InvalidInput, match=expected):
        fmt.check_file_header(header_sample_rate_hz=16000, header_channel_count=1, kind="WAV")
    fmt = AudioFormat(Encoding.FILE, 0, 1)
    with pytest.raises(InvalidInput, match="channel_count is 1 but the FLAC file's header says 2"):
        fmt.check_file_header(header_sample_rate_hz=16000, header_channel_count=2, kind="FLAC")


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        AudioLimits(max_audio_duration_s=0, max_message_bytes=1, max_stream_bytes=1)
