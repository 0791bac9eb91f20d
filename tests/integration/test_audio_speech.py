"""Real (espeak-ng) speech through the audio layer."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pytest
import soundfile
import soxr

from asr_server.audio.chunking import plan_chunks
from asr_server.audio.decode import decode_audio
from asr_server.audio.formats import AudioFormat, AudioLimits, Encoding
from asr_server.audio.g711 import mulaw_encode
from tests.speech import espeak_available, synthesize, synthesize_sentences

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng missing: bash scripts/system-deps.sh")

LIMITS = AudioLimits(max_audio_duration_s=600, max_message_bytes=10_000_000, max_stream_bytes=100_000_000)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back after the meeting.",
    "Seven hundred and twenty three.",
    "It is raining again in the north.",
    "We will arrive at nine in the morning.",
]


def snr_db(actual: np.ndarray, expected: np.ndarray) -> float:
    error = actual.astype(np.float64) - expected.astype(np.float64)
    return float(10 * np.log10(np.sum(expected.astype(np.float64) ** 2) / np.sum(error**2)))


def test_espeak_wav_with_streaming_header_decodes_like_soundfile() -> None:
    # espeak-ng --stdout writes a WAV whose data size is the 0x7FFFF000 "to the end" placeholder.
    wav = subprocess.run(["espeak-ng", "--stdout"], input=SENTENCES[0].encode(), capture_output=True, check=True).stdout
    audio = decode_audio(wav, AudioFormat(Encoding.FILE, 0, 0), limits=LIMITS)
    reference, rate_hz = soundfile.read(io.BytesIO(wav), dtype="float32")
    assert audio.source_sample_rate_hz == rate_hz == 22050
    assert audio.source_frame_count == reference.shape[0]
    expected = soxr.resample(reference, rate_hz, 16000, quality="HQ")
    np.testing.assert_allclose(audio.channels[0], expected, rtol=0, atol=1e-6)


def test_speech_through_8k_mulaw_keeps_the_waveform() -> None:
    speech, rate_hz = synthesize(" ".join(SENTENCES[:2]))
    telephone = soxr.resample(speech.astype(np.float64), rate_hz, 8000, quality="VHQ")
    codes = mulaw_encode(np.clip(np.round(telephone * 32768), -32768, 32767).astype(np.int16))
    audio = decode_audio(codes.tobytes(), AudioFormat(Encoding.MULAW, 8000, 1), limits=LIMITS)
    # Reference: the same telephone-band speech without G.711, brought to 16 kHz; what differs is mu-law's
    # quantisation, whose SNR is about 38 dB for any level. Required: >= 30 dB.
    expected = soxr.resample(telephone, 8000, 16000, quality="VHQ")
    assert audio.sample_count_16k == expected.shape[0]
    assert snr_db(audio.channels[0], expected) >= 30.0


def test_synthesized_sentences_have_true_spans() -> None:
    samples, spans = synthesize_sentences(SENTENCES[:3], silence_s=1.0)
    assert samples.dtype == np.float32 and len(spans) == 3
    assert spans[0][0] == pytest.approx(1.0)
    assert samples.shape[0] / 16000 == pytest.approx(spans[-1][1] + 1.0, abs=1e-3)
    previous_end = 0.0
    for start_s, end_s in spans:
        assert end_s - start_s > 0.5
        assert start_s - previous_end >= 1.0 - 1e-9
        start, end = round(start_s * 16000), round(end_s * 16000)
        assert abs(samples[start]) > 1e-3 and abs(samples[end - 1]) > 1e-3
        assert np.all(np.abs(samples[round(previous_end * 16000) + 1 : start]) <= 1e-3)
        previous_end = end_s


def test_chunks_of_real_speech_are_cut_between_sentences() -> None:
    samples, spans = synthesize_sentences(SENTENCES, silence_s=1.0)
    spans_samples = [(round(s * 16000), round(e * 16000)) for s, e in spans]
    chunks = plan_chunks(samples, max_chunk_s=8.0, search_window_s=2.0)
    assert len(chunks) >= 2
    for chunk in chunks[1:]:
        cut = chunk.start_sample
        assert not any(start <= cut < end for start, end in spans_samples), f"cut at {cut / 16000:.2f} s in speech"
