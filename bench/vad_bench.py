"""Cost of Silero VAD for many live streams, batched as the server batches it: CPU time per 20 ms frame per stream.

    python bench/vad_bench.py [--streams 1,64,256,512] [--seconds 10]

Each tick, every stream hands the VadBatcher one 20 ms piece (320 samples at 16 kHz), all concurrently, as the
streams of a server do; the batcher runs every pending 32 ms VAD frame of every stream in one pass. The table shows
the wall time per tick, its share of the 20 ms real-time budget, and the time per stream per 20 ms of audio.
Runs on whatever the machine has (the server runs VAD on one thread with one torch thread).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time

import numpy as np

from asr_server.streaming.vad import VadBatcher, VadState

PIECE_SAMPLES = 320  # 20 ms at 16 kHz


async def run(streams: int, seconds: float) -> tuple[float, int]:
    vad = VadBatcher()
    states = [VadState() for _ in range(streams)]
    rng = np.random.default_rng(0)
    pieces = (0.05 * rng.standard_normal((streams, PIECE_SAMPLES))).astype(np.float32)
    await vad.frames(VadState(), np.zeros(1024, dtype=np.float32))  # loads the model
    ticks = int(seconds * 50)
    started = time.perf_counter()
    for _ in range(ticks):
        await asyncio.gather(*(vad.frames(state, pieces[i]) for i, state in enumerate(states)))
    elapsed = time.perf_counter() - started
    vad.close()
    return elapsed / ticks, vad.passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,64,256,512")
    parser.add_argument("--seconds", type=float, default=10.0, help="stream audio per run")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {args.seconds:g} s of audio per stream, 20 ms pieces")
    print("| streams | wall per 20 ms tick | share of real time | per stream per 20 ms | VAD passes |")
    print("|---|---|---|---|---|")
    for count in (int(s) for s in args.streams.split(",")):
        tick_s, passes = asyncio.run(run(count, args.seconds))
        print(f"| {count} | {tick_s * 1000:.2f} ms | {tick_s / 0.020:.0%} | {tick_s / count * 1e6:.1f} us | {passes} |")


if __name__ == "__main__":
    main()
