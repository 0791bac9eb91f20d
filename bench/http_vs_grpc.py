"""What the HTTP front costs beside gRPC: one server (`asr-server serve --engine fake`, its own process), the same
WAV clip, the same Transcriber; gRPC Transcribe against the openai SDK's transcriptions.create on --http-port.

    PYTHONPATH=server:gen/python python bench/http_vs_grpc.py --requests 200 --concurrency 1 8 32

Prints per front and concurrency: requests per second, the client's latency p50/p99 (the SDK's own cost included),
and the server's mean handling time per request from its /metrics (grpc_server_handling_seconds,
asr_http_request_duration_seconds): the part a front adds on the server. The fake engine answers at once, so what
is measured is each front's own overhead: parsing, decoding the file, the response. docs/http.md has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import wave
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import openai

from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc

_SERIES = {
    "grpc": ("grpc_server_handling_seconds", 'grpc_method="Transcribe"'),
    "http": ("asr_http_request_duration_seconds", 'route="/v1/audio/transcriptions"'),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_seconds(metrics_port: int, front: str) -> tuple[float, float]:
    """(sum, count) of the front's handling-time histogram."""
    name, label = _SERIES[front]
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    values = {}
    for part in ("sum", "count"):
        found = re.search(rf"^{name}_{part}{{[^}}]*{re.escape(label)}[^}}]*}} (\S+)$", text, re.MULTILINE)
        values[part] = float(found.group(1)) if found else 0.0
    return values["sum"], values["count"]


def clip_wav(seconds: float) -> bytes:
    rng = np.random.default_rng(0)
    pcm = (rng.uniform(-0.3, 0.3, int(seconds * 16000)) * 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(pcm.tobytes())
    return out.getvalue()


async def measure(call: Callable[[], Awaitable[object]], requests: int, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return requests / (time.perf_counter() - started), latencies


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--audio-s", type=float, default=5.0)
    args = parser.parse_args()
    metrics_port = free_port()
    server = subprocess.Popen(  # noqa: ASYNC220 - once, before anything runs on the loop
        [sys.executable, "-m", "asr_server.cli", "serve", "--engine", "fake", "--host", "127.0.0.1", "--port", "0",
         "--http-port", "0", "--metrics-port", str(metrics_port), "--max-batch-wait-ms", "0", "--no-warmup"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = server.stdout.readline() if server.stdout is not None else ""
    ports = re.search(r"on port (\d+); OpenAI-compatible HTTP API: http port (\d+)", line)
    if ports is None:
        server.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    grpc_port, http_port = ports.groups()
    audio = clip_wav(args.audio_s)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = pb_grpc.AsrServiceStub(channel)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="x", max_retries=0)

    async def via_grpc() -> object:
        return await stub.Transcribe(pb.TranscribeRequest(audio=audio))

    async def via_http() -> object:
        return await client.audio.transcriptions.create(model="m", file=("a.wav", audio))

    try:
        for concurrency in args.concurrency:
            for name, call in (("grpc", via_grpc), ("http", via_http)):
                await measure(call, min(20, args.requests), concurrency)  # warm: connections, first imports
                sum_before, count_before = server_seconds(metrics_port, name)
                rate, latencies = await measure(call, args.requests, concurrency)
                sum_after, count_after = server_seconds(metrics_port, name)
                server_ms = (sum_after - sum_before) / max(1.0, count_after - count_before) * 1000
                latencies.sort()
                p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
                print(
                    f"{name} concurrency {concurrency:3d}: {rate:7.1f} req/s  "
                    f"client p50 {statistics.median(latencies):6.1f} ms  p99 {p99:6.1f} ms  "
                    f"server mean {server_ms:6.1f} ms"
                )
    finally:
        await client.close()
        await channel.close()
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    asyncio.run(main())
