"""The Python client's input handling, without a server: every accepted audio form, broadcasting and its errors."""

from __future__ import annotations

import base64
import io
import wave
from pathlib import Path

import numpy as np
import pytest

from asr_client._core import broadcast, pcm_frames, plan_batch
from asr_client.audio import array_audio, decode_data_url, frame_to_bytes, load_audio, to_pcm
from asr_client.results import transcription_from_pb
from qwenasr.v1 import asr_pb2 as pb
from tests.helpers import tone, wav_bytes

WAV = wav_bytes(tone(0.5, seed=1))


def test_a_path_is_read_as_an_encoded_file(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    path.write_bytes(WAV)
    for form in (str(path), path):
        audio = load_audio(form)
        assert audio.data == WAV
        assert audio.audio_format == pb.AudioFormat()  # UNSPECIFIED: the server reads the header


def test_a_missing_path_is_named() -> None:
    with pytest.raises(FileNotFoundError, match="^no such audio file: /nope.wav$"):
        load_audio("/nope.wav")


def test_bytes_and_data_urls_are_sent_as_files() -> None:
    assert load_audio(WAV).data == WAV
    assert load_audio(bytearray(WAV)).data == WAV
    url = "data:audio/wav;base64," + base64.b64encode(WAV).decode()
    audio = load_audio(url)
    assert audio.data == WAV and not audio.is_raw


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:audio/wav,plain", "must be base64"),
        ("data:audio/wav;base64,!!!", "invalid base64"),
        ("data:audio/wav;base64,", "no audio"),
    ],
)
def test_bad_data_urls_are_value_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_data_url(url)


def test_arrays_become_float32_16k_mono_as_the_reference_normalises_them() -> None:
    """Reference (qwen_asr normalize_audio_input): float within [-1, 1] untouched at 16 kHz; int cast unscaled then
    divided by its peak; channels averaged; other rates resampled to 16 kHz."""
    samples = tone(0.25)
    audio = load_audio((samples.astype(np.float64), 16000))
    assert audio.audio_format == pb.AudioFormat(
        encoding=pb.AUDIO_ENCODING_FLOAT32, sample_rate_hz=16000, channel_count=1
    )
    np.testing.assert_array_equal(np.frombuffer(audio.data, "<f4"), samples)
    pcm = (samples * 32767).astype(np.int16)
    audio = load_audio((pcm, 16000))
    np.testing.assert_allclose(np.frombuffer(audio.data, "<f4"), pcm / np.max(np.abs(pcm)), atol=1e-7)
    resampled = load_audio((pcm, 8000))
    assert resampled.audio_format.sample_rate_hz == 16000 and len(resampled.data) == 2 * len(pcm) * 4


def test_stereo_arrays_are_averaged_or_kept_in_either_layout() -> None:
    left, right = tone(0.1, freq_hz=300), tone(0.1, freq_hz=500)
    frames_first = array_audio(np.stack([left, right], axis=1), 16000)
    channels_first = array_audio(np.stack([left, right]), 16000)
    assert frames_first.audio_format.channel_count == channels_first.audio_format.channel_count == 1
    assert frames_first.data == channels_first.data
    np.testing.assert_allclose(np.frombuffer(frames_first.data, "<f4"), (left + right) / 2, atol=1e-7)
    separate = array_audio(np.stack([left, right]), 16000, separate_channels=True)
    assert separate.audio_format.channel_count == 2
    interleaved = np.frombuffer(separate.data, "<f4")
    np.testing.assert_array_equal(interleaved[0::2], left)
    np.testing.assert_array_equal(interleaved[1::2], right)


@pytest.mark.parametrize(
    ("audio", "error", "message"),
    [
        ((np.zeros(10, np.float32), 0), ValueError, "must be positive"),
        ((np.zeros(10, np.float32), 16000.5), ValueError, "whole number of hertz"),
        ((np.zeros(10, np.float32), True), ValueError, "positive number of hertz"),
        ((np.zeros((2, 2, 2), np.float32), 16000), ValueError, "1-D"),
        ((np.zeros(0, np.float32), 16000), ValueError, "empty"),
        ((np.zeros((100, 9), np.float32), 16000), ValueError, "at most 8 channels"),
        ((np.array([0.0, np.nan], np.float32), 16000), ValueError, "NaN"),
        ((np.zeros(10, np.complex64), 16000), ValueError, "int or float samples"),
        ("not base64! " * 30, ValueError, "neither an existing file nor valid base64"),
        ((np.zeros(10, np.float32),), ValueError, r"\(samples, sample_rate\)"),
        (np.zeros(10, np.float32), ValueError, "needs its sample rate"),
        (b"", ValueError, "empty"),
        (12, TypeError, "unsupported audio input int"),
    ],
)
def test_bad_inputs_are_refused_before_anything_is_sent(audio: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        load_audio(audio)  # type: ignore[arg-type]


def test_scalars_broadcast_and_lists_must_match_the_batch() -> None:
    assert broadcast("context", "x", 3) == ["x", "x", "x"]
    assert broadcast("context", ["x"], 3) == ["x", "x", "x"]
    assert broadcast("language", [None, "en"], 2) == [None, "en"]
    with pytest.raises(ValueError, match="batch size mismatch: 3 audio inputs but 2 values for language"):
        broadcast("language", ["en", "de"], 3)


def test_plan_batch_checks_the_shape_before_reading_any_audio() -> None:
    # The paths don't exist: the length mismatch must be reported first.
    with pytest.raises(ValueError, match="2 audio inputs but 3 values for context"):
        plan_batch(["/a.wav", "/b.wav"], ["x", "y", "z"], None, False, fetch_timeout_s=1)
    with pytest.raises(ValueError, match="no audio"):
        plan_batch([], "", None, False, fetch_timeout_s=1)
    jobs = plan_batch([WAV, WAV], "ctx", ["en", ""], True, fetch_timeout_s=1)
    assert [(j.config.context, j.config.language, j.config.return_word_timestamps) for j in jobs] == [
        ("ctx", "en", True),
        ("ctx", "", True),
    ]


def test_live_streams_get_pcm_frames_of_the_asked_length() -> None:
    fmt, frames = pcm_frames(WAV, 20, fetch_timeout_s=1)
    assert fmt == pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000, channel_count=1)
    pieces = list(frames)
    assert {len(p) for p in pieces} == {640}  # 20 ms of 16 kHz 16-bit mono
    with wave.open(io.BytesIO(WAV)) as wav:
        assert b"".join(pieces) == wav.readframes(wav.getnframes())
    fmt, frames = pcm_frames((tone(0.5, rate_hz=8000), 8000), 100, fetch_timeout_s=1)
    assert (fmt.encoding, fmt.sample_rate_hz) == (pb.AUDIO_ENCODING_FLOAT32, 16000)  # resampled as the reference
    assert [len(p) for p in frames] == [6400] * 5  # 100 ms of 16 kHz float32
    fmt, frames = pcm_frames((np.zeros((1000, 3), np.int16), 11025), 10, fetch_timeout_s=1, separate_channels=True)
    assert fmt.channel_count == 3
    assert {len(p) % 12 for p in frames} == {0}  # whole frames of 3 float32 channels


def test_non_wav_files_are_decoded_with_soundfile_for_live_streams() -> None:
    soundfile = pytest.importorskip("soundfile")
    buffer = io.BytesIO()
    soundfile.write(buffer, tone(0.2), 16000, format="FLAC")
    pcm = to_pcm(load_audio(buffer.getvalue()))
    assert pcm.audio_format.encoding == pb.AUDIO_ENCODING_FLOAT32
    assert len(pcm.data) == 0.2 * 16000 * 4


def test_numpy_frames_are_converted_to_the_stream_encoding() -> None:
    linear16 = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000, channel_count=1)
    assert frame_to_bytes(np.array([0.5, -1.0]), linear16) == np.array([16384, -32767], "<i2").tobytes()
    assert frame_to_bytes(b"\x01\x02", linear16) == b"\x01\x02"
    float32 = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_FLOAT32, sample_rate_hz=16000, channel_count=1)
    assert frame_to_bytes(np.array([0.5]), float32) == np.array([0.5], "<f4").tobytes()


def test_responses_become_reference_shaped_results_in_seconds() -> None:
    response = pb.TranscribeResponse(
        transcripts=[
            pb.Transcript(
                text="hello world",
                language="English",
                words=[pb.Word(text="hello", start_ms=120, end_ms=480), pb.Word(text="world", start_ms=500, end_ms=910)],
                segments=[pb.Segment(start_ms=0, end_ms=1000, text="hello world", language="English")],
            )
        ],
        audio_duration_ms=1000,
    )
    result = transcription_from_pb(response, time_stamps=True)
    assert (result.language, result.text, result.duration) == ("English", "hello world", 1.0)
    assert result.time_stamps is not None
    assert [(w.text, w.start_time, w.end_time) for w in result.time_stamps] == [
        ("hello", 0.12, 0.48),
        ("world", 0.5, 0.91),
    ]
    assert result.time_stamps[1] == result.time_stamps.items[1]
    assert transcription_from_pb(response, time_stamps=False).time_stamps is None
