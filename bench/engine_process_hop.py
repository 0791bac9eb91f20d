"""The round-trip cost of the engine-process hop: the fake engine in-process vs in its own process.

    PYTHONPATH=server python bench/engine_process_hop.py [--audio-s 1 5 30] [--requests 300] [--concurrency 64]

What is timed is `engine.decode(request)` as the transcriber calls it, on the same fake core (no model, no batch
delay, no batch wait), once with the EngineRunner in this process and once with an EngineProcess (ZeroMQ over a
unix socket, msgpack frames, the audio as raw float32 bytes, the same EngineRunner inside the child). The difference
is the hop: encoding, the socket both ways, decoding, and the child's event loop. Two loads per audio length:
one request at a time (latency of a lone caller), and a closed loop of --concurrency callers (latency under load
and requests per second). Prints one table; --json writes the rows too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT / "server"))

from asr_server.config import Config, EngineConfig, ServerConfig  # noqa: E402
from asr_server.engine.factory import Engine, build_engine  # noqa: E402
from asr_server.engine.types import DecodeOptions, DecodeRequest  # noqa: E402


def _config(mode: str, concurrency: int) -> Config:
    engine = EngineConfig(
        kind="fake",
        max_batch_wait_ms=0.0,
        max_inference_batch_size=max(1, concurrency),
        max_queued_requests=4 * max(1, concurrency),
        warmup=False,
        process=mode,  # type: ignore[arg-type]
    )
    return Config(server=ServerConfig(gil_switch_interval_ms=0.5), engine=engine)


def _request(audio: np.ndarray) -> DecodeRequest:
    return DecodeRequest(uuid.uuid4().hex, audio, DecodeOptions(None, "", 64))


def _percentiles(latencies_s: list[float]) -> dict[str, float]:
    values = np.array(latencies_s) * 1000.0
    return {
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(values.mean()),
    }


async def _one_at_a_time(engine: Engine, audio: np.ndarray, requests: int) -> dict[str, float]:
    latencies: list[float] = []
    for _ in range(requests):
        started = time.perf_counter()
        await engine.decode(_request(audio))
        latencies.append(time.perf_counter() - started)
    return _percentiles(latencies)


async def _closed_loop(engine: Engine, audio: np.ndarray, requests: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    remaining = [requests]

    async def caller() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            started = time.perf_counter()
            await engine.decode(_request(audio))
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed_s = time.perf_counter() - started
    return {**_percentiles(latencies), "requests_per_s": len(latencies) / elapsed_s}


async def _measure(mode: str, audio_s: list[float], requests: int, concurrency: int) -> list[dict[str, Any]]:
    engine = build_engine(_config(mode, concurrency))
    await engine.start()
    rows: list[dict[str, Any]] = []
    try:
        rng = np.random.default_rng(0)
        for seconds in audio_s:
            audio = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
            await _one_at_a_time(engine, audio, 20)  # warm: first frames, page faults, the child's imports
            alone = await _one_at_a_time(engine, audio, requests)
            loaded = await _closed_loop(engine, audio, requests * 2, concurrency)
            rows.append({"mode": mode, "audio_s": seconds, "concurrency": 1, **alone})
            rows.append({"mode": mode, "audio_s": seconds, "concurrency": concurrency, **loaded})
    finally:
        await engine.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio-s", type=float, nargs="+", default=[1.0, 5.0, 30.0])
    parser.add_argument("--requests", type=int, default=300, help="requests per one-at-a-time run (x2 under load)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    sys.setswitchinterval(0.0005)
    rows: list[dict[str, Any]] = []
    for mode in ("off", "on"):
        rows.extend(asyncio.run(_measure(mode, args.audio_s, args.requests, args.concurrency)))
    machine = platform.processor() or platform.machine()
    print(f"# fake engine, {machine}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    header = ("audio_s", "callers", "mode", "p50_ms", "p99_ms", "req/s", "hop p50", "hop p99")
    print(" ".join(f"{h:>{10 if h == 'mode' else 8}}" for h in header))
    inside = {(r["audio_s"], r["concurrency"]): r for r in rows if r["mode"] == "off"}
    for row in rows:
        base = inside[(row["audio_s"], row["concurrency"])]
        hop50 = row["p50_ms"] - base["p50_ms"] if row["mode"] == "on" else 0.0
        hop99 = row["p99_ms"] - base["p99_ms"] if row["mode"] == "on" else 0.0
        name = "process" if row["mode"] == "on" else "in-process"
        rate = f"{row['requests_per_s']:8.0f}" if "requests_per_s" in row else f"{'':>8}"
        print(
            f"{row['audio_s']:8.1f} {row['concurrency']:8d} {name:>10} {row['p50_ms']:8.3f} {row['p99_ms']:8.3f} "
            f"{rate} {hop50:+8.3f} {hop99:+8.3f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
