"""Throughput of the audio layer on one CPU core: decode + resample to 16 kHz, in audio-seconds per second.

    python bench/audio_decode_bench.py [--seconds 60] [--repeats 7]

The process pins itself to one core and keeps numpy/BLAS to one thread; soxr is single-threaded. Each case is
decoded `repeats` times; the table shows the median and the best run (on a shared machine the best is the
better estimate of what one uncontended core does).
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import io  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import soundfile  # noqa: E402
import soxr  # noqa: E402

from asr_server.audio.chunking import plan_chunks  # noqa: E402
from asr_server.audio.decode import decode_audio  # noqa: E402
from asr_server.audio.formats import AudioFormat, AudioLimits, Encoding  # noqa: E402
from asr_server.audio.g711 import mulaw_encode  # noqa: E402

LIMITS = AudioLimits(max_audio_duration_s=7200, max_message_bytes=1 << 31, max_stream_bytes=1 << 40)


def speechlike(rate_hz: int, channels: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(rate_hz * seconds)) / rate_hz
    columns = [
        0.2 * np.sin(2 * np.pi * (150 + 50 * c) * t) + 0.05 * rng.standard_normal(t.shape[0]) for c in range(channels)
    ]
    return np.stack(columns, axis=1)


def pcm16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16)


def encoded_file(x: np.ndarray, rate_hz: int, container: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, x, rate_hz, format=container)
    return buffer.getvalue()


def cases(seconds: float) -> list[tuple[str, Callable[[], object]]]:
    mono8 = mulaw_encode(pcm16(speechlike(8000, 1, seconds))).tobytes()
    stereo8 = mulaw_encode(pcm16(speechlike(8000, 2, seconds))).tobytes()
    stereo48 = pcm16(speechlike(48000, 2, seconds)).astype("<i2").tobytes()
    stereo44 = speechlike(44100, 2, seconds)
    wav44, flac44, mp344 = (encoded_file(stereo44, 44100, c) for c in ("WAV", "FLAC", "MP3"))
    mulaw_mono = AudioFormat(Encoding.MULAW, 8000, 1)
    mulaw_stereo = AudioFormat(Encoding.MULAW, 8000, 2)
    linear_stereo = AudioFormat(Encoding.LINEAR16, 48000, 2)
    file = AudioFormat(Encoding.FILE, 0, 0)
    float48 = np.ascontiguousarray(speechlike(48000, 1, seconds)[:, 0], dtype=np.float32)
    samples_16k = np.ascontiguousarray(speechlike(16000, 1, seconds)[:, 0], dtype=np.float32)
    return [
        ("MULAW 8 kHz mono", lambda: decode_audio(mono8, mulaw_mono, limits=LIMITS)),
        ("MULAW 8 kHz stereo, per channel", lambda: decode_audio(stereo8, mulaw_stereo, limits=LIMITS)),
        ("MULAW 8 kHz stereo, downmix", lambda: decode_audio(stereo8, mulaw_stereo, limits=LIMITS, downmix=True)),
        ("LINEAR16 48 kHz stereo, per channel", lambda: decode_audio(stereo48, linear_stereo, limits=LIMITS)),
        (
            "LINEAR16 48 kHz stereo, downmix",
            lambda: decode_audio(stereo48, linear_stereo, limits=LIMITS, downmix=True),
        ),
        ("WAV 44.1 kHz stereo, downmix", lambda: decode_audio(wav44, file, limits=LIMITS, downmix=True)),
        ("FLAC 44.1 kHz stereo, downmix", lambda: decode_audio(flac44, file, limits=LIMITS, downmix=True)),
        ("MP3 44.1 kHz stereo, downmix", lambda: decode_audio(mp344, file, limits=LIMITS, downmix=True)),
        ("resample only 48k->16k mono, soxr HQ", lambda: soxr.resample(float48, 48000, 16000, quality="HQ")),
        ("resample only 48k->16k mono, soxr VHQ", lambda: soxr.resample(float48, 48000, 16000, quality="VHQ")),
        ("plan_chunks 16 kHz, 20 s chunks", lambda: plan_chunks(samples_16k, max_chunk_s=20.0)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="audio length per case")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, pinned to one core")
    print(f"# numpy {np.__version__}, soxr {soxr.__version__}, libsndfile {soundfile.__libsndfile_version__}")
    print(f"# {args.seconds:.0f} s of audio per case, {args.repeats} runs; load average {os.getloadavg()[0]:.2f}")
    print(f"{'case':<42} {'median ms':>10} {'best ms':>8} {'audio-s/s median':>17} {'audio-s/s best':>15}")
    for name, run in cases(args.seconds):
        run()  # warm up (allocations, soxr filter design)
        times_s = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            run()
            times_s.append(time.perf_counter() - started)
        median_s, best_s = statistics.median(times_s), min(times_s)
        print(
            f"{name:<42} {median_s * 1000:>10.1f} {best_s * 1000:>8.1f} {args.seconds / median_s:>17,.0f} "
            f"{args.seconds / best_s:>15,.0f}"
        )


if __name__ == "__main__":
    main()
