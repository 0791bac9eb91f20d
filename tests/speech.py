"""Real (synthetic) speech for tests, made offline with espeak-ng (`bash scripts/system-deps.sh` installs it).

    samples, rate_hz = synthesize("hello world")
    samples_16k, spans_s = synthesize_sentences(["One sentence.", "Another one."], silence_s=1.0)

Tests that need it skip when it is missing: `pytest.mark.skipif(not espeak_available(), reason=...)`.
"""

from __future__ import annotations

import functools
import io
import shutil
import subprocess
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import soundfile
import soxr

SAMPLE_RATE_16K_HZ = 16_000
# espeak-ng pads each utterance with a little digital near-silence; samples below this (-60 dBFS) at either end
# are not counted as speech when reporting sentence spans.
_TRIM_LEVEL = 1e-3


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


@functools.lru_cache(maxsize=64)
def _synthesize_cached(text: str, voice: str) -> tuple[bytes, int]:
    # Text goes in on stdin so a sentence starting with '-' is never read as an option.
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "--stdout"], input=text.encode(), capture_output=True, check=True, timeout=60
    ).stdout
    samples, rate_hz = soundfile.read(io.BytesIO(wav), dtype="float32")
    return np.asarray(samples, dtype=np.float32).tobytes(), int(rate_hz)


def synthesize(text: str, *, voice: str = "en") -> tuple[npt.NDArray[np.float32], int]:
    """Speak `text`; returns mono float32 samples and their rate (espeak-ng's native 22050 Hz)."""
    raw, rate_hz = _synthesize_cached(text, voice)
    return np.frombuffer(raw, dtype=np.float32).copy(), rate_hz


def _trim(samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    loud = np.flatnonzero(np.abs(samples) > _TRIM_LEVEL)
    if loud.size == 0:
        return samples[:0]
    return samples[loud[0] : loud[-1] + 1]


def synthesize_sentences(
    sentences: Sequence[str], silence_s: float = 1.0, *, voice: str = "en"
) -> tuple[npt.NDArray[np.float32], list[tuple[float, float]]]:
    """Sentences separated (and preceded and followed) by `silence_s` of digital silence, at 16 kHz.

    Returns the samples and, per sentence, the (start_s, end_s) span of its speech (espeak's own leading and
    trailing near-silence trimmed), so endpointing tests know exactly where speech is.
    """
    silence = np.zeros(round(silence_s * SAMPLE_RATE_16K_HZ), dtype=np.float32)
    parts = [silence]
    spans: list[tuple[float, float]] = []
    position = silence.shape[0]
    for sentence in sentences:
        samples, rate_hz = synthesize(sentence, voice=voice)
        speech = _trim(soxr.resample(samples, rate_hz, SAMPLE_RATE_16K_HZ, quality="HQ").astype(np.float32))
        spans.append((position / SAMPLE_RATE_16K_HZ, (position + speech.shape[0]) / SAMPLE_RATE_16K_HZ))
        parts += [speech, silence]
        position += speech.shape[0] + silence.shape[0]
    return np.concatenate(parts), spans
