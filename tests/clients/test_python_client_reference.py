"""Code ported from the reference `qwen-asr` library (0.0.6, `Qwen3ASRModel` / `Qwen3ForcedAligner`) behaves the
same on `AsrClient`: supported languages, the errors it catches, every audio form and dtype it accepts normalised
as its `normalize_audio_input` does, max_new_tokens, and (an extra) one result per channel. Against the real server
(fake engine: one word per half second named after its loudness, so a changed scale changes the text)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import numpy as np
import pytest
import soxr

from asr_client import AsrClient, AsyncAsrClient, FailedPreconditionError, InvalidArgumentError
from asr_client.audio import load_audio
from qwenasr.v1 import asr_pb2 as pb
from tests.clients.servers import FakeLiveServicer, StubAligner, fake_live_server, threaded_server
from tests.clients.test_python_client import RATE, SAMPLES, TEXT, WAV, Engines, exact_samples, expected_text
from tests.helpers import fake_config, wav_bytes

REFERENCE_LANGUAGES = [
    "Chinese", "English", "Cantonese", "Arabic", "German", "French", "Spanish", "Portuguese", "Indonesian",
    "Italian", "Korean", "Russian", "Thai", "Vietnamese", "Japanese", "Turkish", "Hindi", "Malay", "Dutch",
    "Swedish", "Danish", "Finnish", "Polish", "Czech", "Filipino", "Persian", "Greek", "Romanian", "Hungarian",
    "Macedonian",
]
ALIGNER_LANGUAGES = {"Chinese", "English", "Cantonese", "French", "German", "Italian", "Japanese", "Korean",
                     "Portuguese", "Russian", "Spanish"}


@pytest.fixture(scope="module")
def engines() -> Engines:
    return Engines()


@pytest.fixture(scope="module")
def target(engines: Engines) -> Iterator[str]:
    with threaded_server(fake_config(), core_factory=engines, aligner=StubAligner()) as (_, address):
        yield address


@pytest.fixture()
def client(target: str) -> Iterator[AsrClient]:
    with AsrClient(target, timeout_s=30) as c:
        yield c


def reference_resample(samples: np.ndarray, rate_hz: int) -> np.ndarray:
    """librosa.resample(y, orig_sr=rate, target_sr=16000) as the reference calls it: res_type "soxr_hq" (soxr at
    HQ quality), output length fixed to ceil(n * 16000 / rate)."""
    out = soxr.resample(samples, rate_hz, 16_000, quality="HQ")
    length = int(np.ceil(samples.shape[0] * 16_000 / rate_hz))
    return np.pad(out, (0, max(0, length - out.shape[0])))[:length].astype(np.float32)


def reference_peak(samples: np.ndarray) -> np.ndarray:
    """float_range_normalize: float32; divided by the peak when it exceeds 1.0; clipped to [-1, 1]."""
    audio = samples.astype(np.float32)
    peak = float(np.max(np.abs(audio)))
    return np.clip(audio / peak if peak > 1.0 else audio, -1.0, 1.0)


def test_supported_languages_are_the_reference_lists(client: AsrClient) -> None:
    """Reference: `Qwen3ASRModel.get_supported_languages()` lists its 30 language names in this order; the forced
    aligner covers 11 of them."""
    assert client.get_supported_languages() == REFERENCE_LANGUAGES
    assert set(client.get_supported_aligner_languages()) == ALIGNER_LANGUAGES


async def test_async_supported_languages(target: str) -> None:
    """Reference: as above, on the asyncio client."""
    async with AsyncAsrClient(target) as client:
        assert await client.get_supported_languages() == REFERENCE_LANGUAGES
        assert set(await client.get_supported_aligner_languages()) == ALIGNER_LANGUAGES


def test_errors_that_ported_code_catches_are_value_errors(client: AsrClient) -> None:
    """Reference: an unsupported language and `return_time_stamps=True` without a forced aligner both raise
    ValueError, so `except ValueError` must catch InvalidArgumentError and FailedPreconditionError."""
    with pytest.raises(ValueError, match="Klingon") as unknown:
        client.transcribe(WAV, language="Klingon")
    assert isinstance(unknown.value, InvalidArgumentError)
    with threaded_server(fake_config()) as (_, address), AsrClient(address) as bare:
        with pytest.raises(ValueError, match="aligner") as no_aligner:
            bare.transcribe(WAV, return_time_stamps=True)
    assert isinstance(no_aligner.value, FailedPreconditionError)


def test_bare_base64_is_decoded_like_a_data_url(client: AsrClient) -> None:
    """Reference: a string with no path separator longer than 256 characters is base64 of a file, with or without
    the data: prefix (`is_probably_base64`). Here also base64 that contains '/' when no such file exists."""
    encoded = base64.b64encode(WAV).decode()
    (result,) = client.transcribe(encoded)
    assert (result.text, result.duration) == (TEXT, 2.5)
    with pytest.raises(ValueError, match="neither an existing file nor valid base64"):
        client.transcribe("not base64 at all! " * 20)


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64, np.int8])
def test_int_arrays_are_peak_normalised(client: AsrClient, dtype: type) -> None:
    """Reference: int samples are cast to float32 unscaled, then divided by their peak (it exceeds 1.0), so any int
    dtype gives the signal scaled to a peak of exactly 1.0, whatever its full scale."""
    peak_value = {np.int8: 100, np.int16: 20_000, np.int32: 1_000_000_000, np.int64: 1_000_000_000}[dtype]
    ints = np.round(SAMPLES / np.max(np.abs(SAMPLES)) * peak_value).astype(dtype)
    (result,) = client.transcribe((ints, RATE))
    assert result.text == expected_text(reference_peak(ints.astype(np.float32)))
    assert result.text != TEXT  # the signal itself peaks at 0.3: peak-normalising made it louder


def test_float_arrays_over_full_scale_are_divided_by_their_peak(client: AsrClient) -> None:
    """Reference: a float array whose peak exceeds 1.0 is divided by that peak; one within [-1, 1] is untouched."""
    loud = SAMPLES * 7.0
    (result,) = client.transcribe((loud, RATE))
    assert result.text == expected_text(loud / np.max(np.abs(loud)))
    (quiet,) = client.transcribe((SAMPLES, RATE))
    assert quiet.text == TEXT


def test_an_integral_float_rate_is_accepted_and_a_fractional_one_refused(client: AsrClient) -> None:
    """Reference: the rate goes through int(); 16000.0 is 16 kHz. A fractional rate is refused here rather than
    truncated, since no audio has one."""
    (result,) = client.transcribe((SAMPLES, 16000.0))
    assert result.text == TEXT
    with pytest.raises(ValueError, match="whole number of hertz"):
        client.transcribe((SAMPLES, 16000.5))


@pytest.mark.parametrize("rate_hz", [96_000, 4_000, 44_100])
def test_any_rate_is_resampled_on_the_client_as_the_reference_does(
    client: AsrClient, engines: Engines, rate_hz: int
) -> None:
    """Reference: any rate is resampled to 16 kHz (librosa soxr_hq) before the peak check; the server takes raw
    audio at 8-48 kHz only, so 96 kHz and 4 kHz arrays must be resampled by the client."""
    t = np.arange(int(1.5 * rate_hz)) / rate_hz
    samples = (0.4 * np.sin(2 * np.pi * 300 * t) * (t > 0.5)).astype(np.float32)
    engines.requests.clear()
    (result,) = client.transcribe((samples, rate_hz))
    expected = reference_peak(reference_resample(samples, rate_hz))
    assert result.text == expected_text(expected)
    assert result.duration == 1.5
    (request,) = engines.requests
    np.testing.assert_allclose(request.audio_16k, expected, atol=1e-6)


def test_channels_first_arrays_follow_the_reference_layout_rule() -> None:
    """Reference (`to_mono`): a 2-D array is (channels, frames) when its first axis is at most 8 and shorter than
    the second, else (frames, channels); channels are averaged."""
    left, right = SAMPLES, exact_samples(2.5, seed=3)
    by_rows = load_audio((np.stack([left, right]), RATE))
    by_columns = load_audio((np.stack([left, right], axis=1), RATE))
    assert by_rows.data == by_columns.data
    np.testing.assert_allclose(np.frombuffer(by_rows.data, "<f4"), (left + right) / 2, atol=1e-7)


def test_max_new_tokens_on_the_constructor_and_per_call(target: str) -> None:
    """Reference: `Qwen3ASRModel.from_pretrained(..., max_new_tokens=N)` bounds every generation; here also per
    `transcribe()` call, which overrides the constructor's value."""
    with AsrClient(target, max_new_tokens=2) as client:
        (short,) = client.transcribe(WAV)
        assert short.text == " ".join(TEXT.split()[:2])
        (shorter,) = client.transcribe(WAV, max_new_tokens=1)
        assert shorter.text == TEXT.split()[0]
        with pytest.raises(ValueError, match="max_new_tokens"):
            client.transcribe(WAV, max_new_tokens=-1)


def test_separate_channels_give_one_result_per_channel(client: AsrClient) -> None:
    """No reference counterpart (it always averages channels); here `channel_mode="separate"` gives one result per
    channel of every input, for arrays (each channel normalised as the reference would a mono array) and files."""
    left, right = SAMPLES, exact_samples(2.5, seed=3)
    stereo = np.stack([left, right], axis=1)
    interleaved_wav = wav_bytes(stereo.reshape(-1), channels=2)
    results = client.transcribe([(stereo, RATE), interleaved_wav], channel_mode="separate")
    assert len(results) == 2
    for per_channel in results:
        assert [(r.channel_index, r.text) for r in per_channel] == [
            (0, expected_text(left)), (1, expected_text(right))
        ]
    (downmixed,) = client.transcribe((stereo, RATE))
    assert downmixed.text == expected_text((left + right) / 2)
    with pytest.raises(ValueError, match="channel_mode"):
        client.transcribe(WAV, channel_mode="both")  # type: ignore[call-overload]


async def test_async_separate_channels(target: str) -> None:
    """As above, on the asyncio client."""
    left, right = SAMPLES, exact_samples(2.5, seed=3)
    async with AsyncAsrClient(target) as client:
        (per_channel,) = await client.transcribe((np.stack([left, right]), RATE), channel_mode="separate")
    assert [r.text for r in per_channel] == [expected_text(left), expected_text(right)]


def test_stream_is_not_paced_by_default_and_can_separate_channels() -> None:
    """`stream()` and `asr-client stream` share one default: as fast as the connection takes it (realtime=False);
    a live source paces itself. `channel_mode="separate"` reaches the server's config with the channels kept."""
    servicer = FakeLiveServicer()
    stereo = np.stack([SAMPLES[:16_000], exact_samples(1.0, seed=3)], axis=1)
    with fake_live_server(servicer) as address, AsrClient(address) as client:
        started = time.monotonic()
        results = list(client.stream((stereo, RATE), channel_mode="separate", interim_results=False))
        assert time.monotonic() - started < 0.8  # 1 s of audio, not paced
    assert results[-1].is_final
    config = servicer.configs[0].config
    assert config.channel_mode == pb.CHANNEL_MODE_SEPARATE
    assert config.audio_format == pb.AudioFormat(encoding=pb.AUDIO_ENCODING_FLOAT32, sample_rate_hz=RATE,
                                                 channel_count=2)
    assert len(servicer.received) == 16_000 * 2 * 4
