"""What Ray Serve's gRPC proxy hop costs (docs/scale-out.md): a 5 s unary Transcribe, direct vs through Ray.

    PYTHONPATH=server:clients/python:gen/python .venv/bin/python bench/ray_proxy_hop.py --calls 300

The same server flags both ways (fake engine by default, so the figures are the hop's, not the model's): "direct"
is `asr-server serve` in its own process; "ray" is a one-replica Ray Serve application on a local Ray cluster
(the replica runs that server on loopback, edge/ray_serve.py) called through Ray's gRPC proxy. Calls go one after
another (concurrency 1) and then --concurrency at a time; prints p50/p99 latency for each, as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "server"), str(REPO / "gen/python"), str(REPO / "clients/python")]

from qwenasr.v1 import asr_pb2 as pb  # noqa: E402
from qwenasr.v1 import asr_pb2_grpc as pb_grpc  # noqa: E402


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _request(audio_s: float) -> pb.TranscribeRequest:
    rng = np.random.default_rng(0)
    pcm = (rng.uniform(-0.3, 0.3, int(audio_s * 16000)) * 32767).astype("<i2").tobytes()
    fmt = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000, channel_count=1)
    return pb.TranscribeRequest(config=pb.RecognitionConfig(audio_format=fmt), audio=pcm)


async def _measure(target: str, request: pb.TranscribeRequest, calls: int, concurrency: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.AsrServiceStub(channel)
        for _ in range(10):  # warm: connection, first-call set-up
            await stub.Transcribe(request, timeout=30)
        latencies: list[float] = []

        async def caller(n: int) -> None:
            for _ in range(n):
                started = time.perf_counter()
                await stub.Transcribe(request, timeout=30)
                latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(caller(calls // concurrency) for _ in range(concurrency)))
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(quantiles[98], 2),
        "calls": len(latencies),
        "concurrency": concurrency,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--audio-s", type=float, default=5.0)
    parser.add_argument("--server-args", default="--engine fake --no-warmup --max-batch-wait-ms 0")
    args = parser.parse_args()
    server_args = args.server_args.split()
    request = _request(args.audio_s)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path[:3])}
    results: dict[str, object] = {"audio_s": args.audio_s, "server_args": args.server_args, "cpus": os.cpu_count()}

    port = _free_port()
    direct = subprocess.Popen(
        [sys.executable, "-m", "asr_server.cli", "serve", *server_args, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert direct.stdout is not None
        while "serving" not in direct.stdout.readline():
            pass
        target = f"127.0.0.1:{port}"
        results["direct"] = [asyncio.run(_measure(target, request, args.calls, c)) for c in (1, args.concurrency)]
    finally:
        direct.terminate()
        direct.wait()

    os.environ.update(env)
    import ray
    from ray import serve

    from asr_server.edge import ray_serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    grpc_port = _free_port()
    ray_serve.start_serve(
        ray_serve.RayServeFile(
            grpc_port=grpc_port,
            server_args=tuple(server_args),
            deployment=ray_serve.DeploymentOptions(num_replicas=1, num_cpus=1),
        )
    )
    try:
        target = f"127.0.0.1:{grpc_port}"
        results["ray"] = [asyncio.run(_measure(target, request, args.calls, c)) for c in (1, args.concurrency)]
    finally:
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
