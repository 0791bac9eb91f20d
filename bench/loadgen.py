"""Load generator for the real gRPC server: N concurrent callers, each sending requests back to back.

    python bench/loadgen.py --target localhost:50051 --concurrency 128 --audio-s 120 --requests 256 --mode unary

Modes: unary (Transcribe, the whole clip in one message), stream (TranscribeStream, client-streaming upload in
64 KiB pieces), bidi (StreamingRecognize, the clip sent as fast as the server takes it, then half-closed; the
first response marks time to first result). Audio is random noise as 16 kHz LINEAR16; with a random-weight model
start the server with --bench-forced-tokens-per-audio-s 4 so each clip generates 4 tokens per audio second (+6).

Prints audio-seconds per second (all audio sent over the wall time from the first request to the last
response), RTF (latency / audio length, mean), end-to-end latency p50/p90/p99, the server's own queue-wait and
inference times (ServerTiming, p50), the server's time to first token (ServerTiming.first_token_ms, p50/p99; the
continuous engine reports it), time to first result (bidi), and the GPU memory in use (nvidia-smi peak).
With --json PATH, writes every number and each request's latency there. With --results-json PATH, appends one
object of the committed results' shape (bench/results/h200-engine.json: concurrency, audio_s, mode, model, side =
ours | generate, audio_s_per_s, latency_ms, ttft_ms, date, commit, and the GPU's mean utilisation) to the list there,
so the next run can be compared with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000
PIECE_BYTES = 64 * 1024


@dataclass
class Sample:
    latency_s: float
    audio_s: float
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    first_result_s: float | None = None
    # ServerTiming.first_token_ms: engine hand-over to the first generated token (unary and stream modes).
    first_token_ms: float | None = None
    error: str = ""


@dataclass
class Report:
    mode: str
    concurrency: int
    audio_s: float
    requests: int
    errors: int
    wall_s: float
    audio_s_per_s: float
    rtf_mean: float
    latency_ms: dict[str, float]
    server_queue_ms_p50: float
    server_inference_ms_p50: float
    first_result_ms: dict[str, float]
    server_first_token_ms: dict[str, float]
    gpu_memory_mib_peak: int | None
    gpu_util_pct_mean: float | None
    samples: list[dict[str, Any]] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def make_audio(audio_s: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    samples = (0.1 * rng.standard_normal(int(audio_s * SAMPLE_RATE))).clip(-1, 1)
    return (samples * 32767).astype("<i2").tobytes()


class GpuMemory:
    """Peak GPU memory in use (MiB, summed over GPUs) and mean utilisation (%, averaged over GPUs and samples),
    sampled with nvidia-smi every 0.5 s while the load runs."""

    def __init__(self) -> None:
        self.peak: int | None = None
        self._util_pct: list[float] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def util_pct_mean(self) -> float | None:
        return statistics.fmean(self._util_pct) if self._util_pct else None

    async def _poll(self) -> None:
        while True:
            try:
                out = await asyncio.to_thread(
                    subprocess.run,
                    ["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                )
                rows = [[int(x) for x in line.split(",")] for line in out.stdout.strip().splitlines()]
                self.peak = max(self.peak or 0, sum(row[0] for row in rows))
                self._util_pct.append(statistics.fmean(row[1] for row in rows))
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            await asyncio.sleep(0.5)

    def start(self) -> None:
        if shutil.which("nvidia-smi"):
            self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


async def run(args: argparse.Namespace) -> Report:
    import grpc
    import grpc.aio

    from qwenasr.v1 import asr_pb2 as pb
    from qwenasr.v1 import asr_pb2_grpc as pb_grpc

    options = [("grpc.max_send_message_length", 256 * 2**20), ("grpc.max_receive_message_length", 256 * 2**20)]
    channel = grpc.aio.insecure_channel(args.target, options=options)
    stub = pb_grpc.AsrServiceStub(channel)
    fmt = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=SAMPLE_RATE, channel_count=1)
    config = pb.RecognitionConfig(audio_format=fmt, language=args.language, max_new_tokens=args.max_new_tokens)
    clips = [make_audio(args.audio_s, seed) for seed in range(4)]

    async def one(index: int) -> Sample:
        audio = clips[index % len(clips)]
        start = time.perf_counter()
        first: float | None = None
        try:
            if args.mode == "unary":
                response = await stub.Transcribe(pb.TranscribeRequest(config=config, audio=audio))
                timing = response.timing
            elif args.mode == "stream":

                async def upload() -> Any:
                    yield pb.TranscribeStreamRequest(config=config)
                    for i in range(0, len(audio), PIECE_BYTES):
                        yield pb.TranscribeStreamRequest(audio=audio[i : i + PIECE_BYTES])

                response = await stub.TranscribeStream(upload())
                timing = response.timing
            else:
                live = pb.StreamingRecognitionConfig(config=config, interim_results=False)

                async def live_upload() -> Any:
                    yield pb.StreamingRecognizeRequest(config=live)
                    for i in range(0, len(audio), PIECE_BYTES):
                        yield pb.StreamingRecognizeRequest(audio=audio[i : i + PIECE_BYTES])

                timing = None
                async for message in stub.StreamingRecognize(live_upload()):
                    if first is None and message.WhichOneof("event") == "result":
                        first = time.perf_counter() - start
            latency = time.perf_counter() - start
            sample = Sample(latency, args.audio_s, first_result_s=first)
            if timing is not None:
                sample.queue_ms = float(timing.queue_wait_ms)
                sample.inference_ms = float(timing.inference_ms)
                if timing.first_token_ms:  # 0: the engine does not report it
                    sample.first_token_ms = float(timing.first_token_ms)
            return sample
        except grpc.aio.AioRpcError as exc:
            return Sample(time.perf_counter() - start, args.audio_s, error=f"{exc.code().name}: {exc.details()}")

    # Warm-up requests (not counted): the first calls pay for connection set-up.
    for i in range(args.warmup):
        await one(i)

    samples: list[Sample] = []
    next_index = 0
    lock = asyncio.Lock()

    async def caller() -> None:
        nonlocal next_index
        while True:
            async with lock:
                if next_index >= args.requests:
                    return
                index = next_index
                next_index += 1
            samples.append(await one(index))

    gpu = GpuMemory()
    gpu.start()
    wall_start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(args.concurrency)))
    wall = time.perf_counter() - wall_start
    await gpu.stop()
    await channel.close()

    ok = [s for s in samples if not s.error]
    latencies = [s.latency_s * 1000 for s in ok]
    firsts = [s.first_result_s * 1000 for s in ok if s.first_result_s is not None]
    first_tokens = [s.first_token_ms for s in ok if s.first_token_ms is not None]
    return Report(
        mode=args.mode,
        concurrency=args.concurrency,
        audio_s=args.audio_s,
        requests=len(samples),
        errors=len(samples) - len(ok),
        wall_s=wall,
        audio_s_per_s=sum(s.audio_s for s in ok) / wall if wall > 0 else 0.0,
        rtf_mean=statistics.fmean(s.latency_s / s.audio_s for s in ok) if ok else float("nan"),
        latency_ms={
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99),
        },
        server_queue_ms_p50=percentile([s.queue_ms for s in ok], 50),
        server_inference_ms_p50=percentile([s.inference_ms for s in ok], 50),
        first_result_ms={"p50": percentile(firsts, 50), "p99": percentile(firsts, 99)},
        server_first_token_ms={"p50": percentile(first_tokens, 50), "p99": percentile(first_tokens, 99)},
        gpu_memory_mib_peak=gpu.peak,
        gpu_util_pct_mean=gpu.util_pct_mean,
        samples=[asdict(s) for s in samples],
    )


def summary(report: Report, label: str) -> str:
    lat = report.latency_ms
    errors = f" ERRORS={report.errors}" if report.errors else ""
    first = f" first_result_p50={report.first_result_ms['p50']:.0f}ms" if report.mode == "bidi" else ""
    ttft = report.server_first_token_ms
    if ttft["p50"] == ttft["p50"]:  # not NaN: the engine reports it
        first += f" srv first token p50/p99 {ttft['p50']:.0f}/{ttft['p99']:.0f} ms"
    return (
        f"{label:<28} {report.mode:<6} c={report.concurrency:<4} {report.audio_s:>5.0f}s x{report.requests:<4} "
        f"{report.audio_s_per_s:8.1f} audio-s/s  RTF {report.rtf_mean:.4f}  "
        f"p50/p90/p99 {lat['p50']:.0f}/{lat['p90']:.0f}/{lat['p99']:.0f} ms  "
        f"srv q/inf p50 {report.server_queue_ms_p50:.0f}/{report.server_inference_ms_p50:.0f} ms  "
        f"gpu {report.gpu_memory_mib_peak} MiB util {_pct(report.gpu_util_pct_mean)}{first}{errors}"
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def _finite(value: float) -> float | None:
    return None if value != value else round(value, 1)


def results_row(report: Report, *, model: str, side: str, commit: str) -> dict[str, Any]:
    """One object of bench/results/h200-engine.json's shape (NaN, e.g. no first-token time, becomes null)."""
    return {
        "concurrency": report.concurrency,
        "audio_s": report.audio_s,
        "mode": report.mode,
        "model": model,
        "side": side,
        "requests": report.requests,
        "errors": report.errors,
        "audio_s_per_s": round(report.audio_s_per_s, 1),
        "latency_ms": {k: _finite(v) for k, v in report.latency_ms.items()},
        "ttft_ms": {k: _finite(v) for k, v in report.server_first_token_ms.items()},
        "gpu_util_pct_mean": None if report.gpu_util_pct_mean is None else round(report.gpu_util_pct_mean, 1),
        "gpu_memory_mib_peak": report.gpu_memory_mib_peak,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
    }


def append_results(path: str, row: dict[str, Any]) -> None:
    target = Path(path)
    rows = json.loads(target.read_text(encoding="utf-8")) if target.exists() else []
    rows.append(row)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--mode", choices=("unary", "stream", "bidi"), default="unary")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--audio-s", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=0, help="total requests (default: 2 x concurrency)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--language", default="")
    parser.add_argument("--max-new-tokens", type=int, default=0)
    parser.add_argument("--label", default="")
    parser.add_argument("--json", default="", help="write the full report here")
    parser.add_argument("--results-json", default="", help="append one results object (the committed shape) here")
    parser.add_argument("--model-name", default="", help="results: the model measured (e.g. 1.7B)")
    parser.add_argument("--side", choices=("ours", "generate"), default="ours", help="results: which engine served")
    parser.add_argument("--commit", default="", help="results: the commit measured")
    args = parser.parse_args(argv)
    if args.requests <= 0:
        args.requests = 2 * args.concurrency
    report = asyncio.run(run(args))
    print(summary(report, args.label or f"{args.mode}-{args.audio_s:g}s"), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(asdict(report), fh, indent=1)
    if args.results_json:
        row = results_row(report, model=args.model_name, side=args.side, commit=args.commit)
        append_results(args.results_json, row)
    return 1 if report.errors == report.requests else 0


if __name__ == "__main__":
    sys.exit(main())
