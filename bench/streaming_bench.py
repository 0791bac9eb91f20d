"""Live-streaming latency: N concurrent real-time StreamingRecognize streams of speech.

    # against a running server (e.g. the GPU server of bench/run_gpu.sh)
    python bench/streaming_bench.py --target localhost:50551 --streams 1,16,64,128 --duration-s 40
    # a server process started by this script (its flags after --serve), e.g. the fake engine or a tiny model
    python bench/streaming_bench.py --serve "--engine fake" --streams 1,16,64,128
    python bench/streaming_bench.py --serve "--model artifacts/tiny/tiny-asr-hf --device cpu" --streams 1,16
    # in-process server (client and server share one Python process: only for quick looks)
    python bench/streaming_bench.py --engine fake --streams 1,16

Each stream sends 16 kHz LINEAR16 speech (espeak-ng sentences separated by 1 s of silence, or --speech WAV) at
real-time pace in --piece-ms pieces, starting at a different point of the recording, with interim results every
--interval-ms. Measured per utterance, from the client's clock:
- final latency: final received - the moment the audio up to the utterance's end was sent (this includes
  the endpointer's trailing-silence wait, 800 ms by default, which no decode can beat);
- final decode latency: final received - its SPEECH_ENDED event received (the server's decode + align time);
- interim latency: interim received - the moment the audio up to that interim's end was sent.
Prints one line per concurrency level; --json writes every number; --results-json appends one object per level to a
JSON list in the shape of bench/results/h200-streaming.json (docs/streaming.md).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "server"), str(REPO / "gen" / "python")]

SENTENCES = [
    "Hello there, how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "Streaming recognition turns speech into text while the speaker is still talking.",
]


@dataclass
class StreamStats:
    finals: int = 0
    final_latency_s: list[float] = field(default_factory=list)
    final_decode_s: list[float] = field(default_factory=list)
    interim_latency_s: list[float] = field(default_factory=list)
    interims: int = 0
    max_send_lag_s: float = 0.0
    error: str = ""
    # Finals later than SLOW_FINAL_S after their audio was sent, with what the stream saw around them.
    slow_finals: list[dict[str, Any]] = field(default_factory=list)


# A final this late (incl. the trailing silence) is written out with its details (--json, "slow_finals").
SLOW_FINAL_S = 1.5


def load_speech(path: str | None) -> np.ndarray:
    if path:
        import soundfile

        samples, rate = soundfile.read(path, dtype="float32")
        if rate != 16000 or samples.ndim != 1:
            raise SystemExit(f"{path}: need 16 kHz mono, got {rate} Hz, shape {samples.shape}")
        return np.asarray(samples, dtype=np.float32)
    from tests.speech import espeak_available, synthesize_sentences

    if not espeak_available():
        raise SystemExit("espeak-ng is not installed: pass --speech WAV (16 kHz mono)")
    return synthesize_sentences(SENTENCES, silence_s=1.0)[0]


async def one_stream(stub: Any, pb: Any, pcm: bytes, offset_ms: int, args: argparse.Namespace) -> StreamStats:
    stats = StreamStats()
    sent: list[tuple[int, float]] = []  # (stream position in ms after a piece, time it was sent)
    piece = args.piece_ms * 32
    total = args.duration_s * 1000 * 32
    start_byte = (offset_ms * 32) % len(pcm)
    started = time.perf_counter()

    async def requests() -> AsyncIterator[Any]:
        config = pb.RecognitionConfig(
            audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000, channel_count=1),
            language=args.language,
        )
        yield pb.StreamingRecognizeRequest(
            config=pb.StreamingRecognitionConfig(
                config=config, interim_results=args.interval_ms > 0, interim_interval_ms=args.interval_ms
            )
        )
        for position in range(0, total, piece):
            due = started + position / 32 / 1000
            lag = time.perf_counter() - due
            if lag < 0:
                await asyncio.sleep(-lag)
            else:
                stats.max_send_lag_s = max(stats.max_send_lag_s, lag)
            begin = (start_byte + position) % len(pcm)
            chunk = pcm[begin : begin + piece]
            if len(chunk) < piece:
                chunk += pcm[: piece - len(chunk)]
            yield pb.StreamingRecognizeRequest(audio=chunk)
            sent.append(((position + piece) // 32, time.perf_counter()))

    def sent_at(ms: int) -> float | None:
        i = bisect.bisect_left(sent, (ms, -1.0))
        return sent[i][1] if i < len(sent) else None

    ended_at: dict[int, float] = {}
    # SPEECH_ENDED: its time in the stream (ms), and how long after that audio was sent it arrived.
    ended_event: dict[int, tuple[int, float]] = {}
    processed_ms = 0  # the server's processed_audio_ms on its newest result
    try:
        async for response in stub.StreamingRecognize(requests()):
            now = time.perf_counter()
            processed_ms = max(processed_ms, int(response.processed_audio_ms))
            if response.HasField("speech_event"):
                if response.speech_event.type == pb.SPEECH_EVENT_TYPE_SPEECH_ENDED:
                    event_ms = int(response.speech_event.offset_ms)
                    event_sent = sent_at(event_ms)
                    ended_event[len(ended_at)] = (event_ms, now - event_sent if event_sent is not None else -1.0)
                    ended_at[len(ended_at)] = now
                continue
            result = response.result
            audio_sent = sent_at(result.end_ms)
            if result.is_final:
                stats.finals += 1
                if audio_sent is not None and result.end_ms < total // 32 - 2000:  # not the half-close flush
                    stats.final_latency_s.append(now - audio_sent)
                    if result.utterance_index in ended_at:
                        stats.final_decode_s.append(now - ended_at[result.utterance_index])
                    if now - audio_sent > SLOW_FINAL_S and len(stats.slow_finals) < 20:
                        event = ended_event.get(result.utterance_index, (-1, -1.0))
                        stats.slow_finals.append(
                            {
                                "offset_ms": offset_ms,
                                "utterance": result.utterance_index,
                                "start_ms": result.start_ms,
                                "end_ms": result.end_ms,
                                "latency_ms": round((now - audio_sent) * 1000),
                                "at_s": round(now - started, 2),
                                "speech_ended_ms": event[0],
                                "speech_ended_lag_ms": round(event[1] * 1000),
                                "processed_ms": processed_ms,
                                "sent_ms": sent[-1][0] if sent else 0,
                            }
                        )
            else:
                stats.interims += 1
                if audio_sent is not None:
                    stats.interim_latency_s.append(now - audio_sent)
    except Exception as exc:  # noqa: BLE001 - counted and shown; the other streams go on
        stats.error = f"{type(exc).__name__}: {exc}"[:200]
    return stats


def sent_window(pcm: bytes, offset_ms: int, duration_s: int) -> bytes:
    """The bytes one_stream sends: duration_s of the recording looped, from offset_ms."""
    start = (offset_ms * 32) % len(pcm)
    total = duration_s * 1000 * 32
    return (pcm * (2 + total // len(pcm)))[start : start + total]


def expected_utterances(audio_bytes: bytes, trailing_silence_ms: int = 800, min_speech_ms: int = 160) -> int:
    """How many finals a stream of this LINEAR16 audio should get: runs of speech (32 ms frames above -60 dBFS)
    that pauses shorter than the trailing silence do not split, at least min_speech_ms long (the last one is
    flushed by the half-close). Exact for espeak-ng sentences between digital silence; an estimate otherwise."""
    samples = np.frombuffer(audio_bytes, dtype="<i2").astype(np.float32) / 32768.0
    frame = 512
    frames = samples[: samples.shape[0] // frame * frame].reshape(-1, frame)
    speech = np.sqrt(np.mean(np.square(frames), axis=1)) > 1e-3
    runs: list[list[int]] = []  # [first, last] speech frame of each utterance
    gap_frames = trailing_silence_ms * 16 // frame
    for index in np.flatnonzero(speech):
        if runs and index - runs[-1][1] - 1 < gap_frames:
            runs[-1][1] = int(index)
        else:
            runs.append([int(index), int(index)])
    return sum(1 for first, last in runs if (last - first + 1) * frame >= min_speech_ms * 16)


def pct(values: list[float], q: float) -> int | None:
    return round(float(np.percentile(values, q)) * 1000) if values else None


async def run_group(target: str, pcm: bytes, offsets: list[int], args: argparse.Namespace) -> list[StreamStats]:
    """Streams from `offsets`, --streams-per-channel of them on each channel (each its own TCP connection, as
    separate callers have: with --front-processes the kernel spreads connections over the fronts)."""
    import grpc

    from qwenasr.v1 import asr_pb2 as pb
    from qwenasr.v1 import asr_pb2_grpc as pb_grpc

    per = max(1, args.streams_per_channel)
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(-(-len(offsets) // per))
    ]
    try:
        stubs = [pb_grpc.AsrServiceStub(channel) for channel in channels]
        return list(
            await asyncio.gather(*(one_stream(stubs[i // per], pb, pcm, off, args) for i, off in enumerate(offsets)))
        )
    finally:
        for channel in channels:
            await channel.close()


def _group_process(target: str, pcm: bytes, offsets: list[int], args: argparse.Namespace) -> list[StreamStats]:
    return asyncio.run(run_group(target, pcm, offsets, args))


class Utilisation:
    """What a level kept busy, from its start to its end: the GPU (nvidia-smi's utilisation every 500 ms, where
    there is one), and the host: the machine's busy share of all cores, and the CPU time of the server's processes
    (the one --serve started and its children: fronts, engine) and of this script's client processes, in cores
    (CPU seconds / wall seconds), each process's own figure kept: one process near its GIL's single core is the
    limit however idle the machine is."""

    def __init__(self, server_pid: int | None) -> None:
        import psutil

        self._psutil = psutil
        self._server_pid = server_pid
        self._smi: subprocess.Popen[str] | None = None
        smi = shutil.which("nvidia-smi")
        if smi:
            self._smi = subprocess.Popen(
                [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        self._wall_s = time.perf_counter()
        self._machine = psutil.cpu_times()
        self._cpu_s = self._cpu_seconds()

    def _tree(self, root: Any) -> list[Any]:
        try:
            return [root, *root.children(recursive=True)]
        except self._psutil.Error:
            return []

    def _cpu_seconds(self) -> dict[int, tuple[str, float]]:
        """pid -> (role, user + system CPU seconds) of every live process in the server's tree and in ours; our own
        entry also holds our ended children's (the client processes of a level end before it is measured)."""
        psutil = self._psutil
        seen: dict[int, tuple[str, float]] = {}
        server_tree: list[Any] = []
        if self._server_pid is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                server_tree = self._tree(psutil.Process(self._server_pid))
        server_pids = {p.pid for p in server_tree}
        me = psutil.Process()
        clients = [p for p in self._tree(me) if p.pid not in server_pids]
        for role, tree in (("server", server_tree), ("client", clients)):
            for process in tree:
                try:
                    times = process.cpu_times()
                except psutil.Error:
                    continue  # ended meanwhile: its last moments are not counted
                seconds = times.user + times.system
                if process.pid == me.pid:
                    # Reaped children only: the server is alive (its processes are counted above).
                    seconds += times.children_user + times.children_system
                seen[process.pid] = (role, seconds)
        return seen

    def finish(self) -> dict[str, Any]:
        wall_s = max(1e-6, time.perf_counter() - self._wall_s)
        machine = self._psutil.cpu_times()
        total = sum(machine) - sum(self._machine)
        idle = (machine.idle + getattr(machine, "iowait", 0.0)) - (
            self._machine.idle + getattr(self._machine, "iowait", 0.0)
        )
        cores: dict[str, list[float]] = {"server": [], "client": []}
        for pid, (role, seconds) in self._cpu_seconds().items():
            before = self._cpu_s.get(pid, (role, 0.0))[1]  # a process started during the level: all of its time
            cores[role].append(round((seconds - before) / wall_s, 2))
        gpu: float | None = None
        if self._smi is not None:
            self._smi.terminate()
            out, _ = self._smi.communicate(timeout=10)
            samples = [float(line) for line in out.split() if line.replace(".", "", 1).isdigit()]
            gpu = round(sum(samples) / len(samples)) if samples else None
        return {
            "gpu_busy_pct": gpu,
            "host_cpu": {
                "machine_busy_pct": round(100 * (1 - idle / total)) if total > 0 else None,
                "machine_cores": self._psutil.cpu_count(),
                "server_cores": round(sum(cores["server"]), 2) if self._server_pid is not None else None,
                "server_process_cores": sorted(cores["server"], reverse=True),
                "client_cores": round(sum(cores["client"]), 2),
            },
        }


async def run_level(target: str, pcm: bytes, streams: int, args: argparse.Namespace) -> dict[str, Any]:
    length_ms = len(pcm) // 32
    rng = np.random.default_rng(streams)
    offsets = [int(rng.integers(0, length_ms)) for _ in range(streams)]
    started = time.perf_counter()
    utilisation = Utilisation(getattr(args, "server_pid", None))
    workers = max(1, min(args.client_processes, streams))
    if workers == 1:
        results = await run_group(target, pcm, offsets, args)
    else:
        # The client's own event loop must not be what falls behind: 20 ms pieces of 256 streams are 12,800
        # messages a second each way.
        import concurrent.futures
        import multiprocessing

        loop = asyncio.get_running_loop()
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            groups = await asyncio.gather(
                *(
                    loop.run_in_executor(pool, _group_process, target, pcm, offsets[w::workers], args)
                    for w in range(workers)
                )
            )
        results = [stats for group in groups for stats in group]
    wall = time.perf_counter() - started
    busy = utilisation.finish()
    finals_expected = sum(expected_utterances(sent_window(pcm, off, args.duration_s)) for off in offsets)
    finals = [v for r in results for v in r.final_latency_s]
    decode = [v for r in results for v in r.final_decode_s]
    interim = [v for r in results for v in r.interim_latency_s]
    errors = [r.error for r in results if r.error]
    row = {
        "streams": streams,
        "duration_s": args.duration_s,
        "wall_s": round(wall, 1),
        "finals": sum(r.finals for r in results),
        "finals_expected": finals_expected,
        "interims": sum(r.interims for r in results),
        "final_ms": {q: pct(finals, q) for q in (50, 90, 99)},
        "final_decode_ms": {q: pct(decode, q) for q in (50, 90, 99)},
        "interim_ms": {q: pct(interim, q) for q in (50, 90, 99)},
        "max_client_send_lag_ms": round(max(r.max_send_lag_s for r in results) * 1000),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "front_processes": args.target_front_processes or front_processes(args.serve),
        "client_processes": workers,
        "slow_finals": [s for r in results for s in r.slow_finals][:100],
        **busy,
    }
    print(
        f"streams={streams:4d}  finals={row['finals']:5d}/{finals_expected}  "
        f"final p50/p90/p99 {row['final_ms'][50]}/{row['final_ms'][90]}/{row['final_ms'][99]} ms  "
        f"(decode {row['final_decode_ms'][50]}/{row['final_decode_ms'][90]}/{row['final_decode_ms'][99]})  "
        f"interim p50/p90/p99 {row['interim_ms'][50]}/{row['interim_ms'][90]}/{row['interim_ms'][99]} ms  "
        f"interims={row['interims']}  send-lag max {row['max_client_send_lag_ms']} ms  errors={row['errors']}",
        flush=True,
    )
    host = busy["host_cpu"]
    gpu = "none" if busy["gpu_busy_pct"] is None else f"{busy['gpu_busy_pct']}% busy"
    server = (
        ""
        if host["server_cores"] is None
        else (
            f"; server {host['server_cores']} cores (by process {'/'.join(map(str, host['server_process_cores'][:8]))})"
        )
    )
    print(
        f"  busy: GPU {gpu}; host {host['machine_busy_pct']}% of {host['machine_cores']} cores{server}; "
        f"clients {host['client_cores']} cores",
        flush=True,
    )
    if errors:
        print("  first error:", errors[0], flush=True)
    for slow in row["slow_finals"][:8]:
        print("  slow final:", slow, flush=True)
    return row


async def main() -> tuple[argparse.Namespace, list[dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="host:port of a running server; default: an in-process server")
    parser.add_argument("--serve", help="start `asr-server serve` with these flags in its own process and use it")
    parser.add_argument("--engine", default="fake", choices=["fake", "transformers"], help="in-process engine")
    parser.add_argument("--model", help="in-process: model directory (implies --engine transformers)")
    parser.add_argument("--streams", default="1,16,64,128")
    parser.add_argument("--duration-s", type=int, default=30, help="audio per stream, sent in real time")
    parser.add_argument("--piece-ms", type=int, default=20)
    parser.add_argument("--warmup-streams", type=int, default=0, help="a first level of this many streams, not kept")
    parser.add_argument("--warmup-s", type=int, default=10, help="seconds of audio per warm-up stream")
    parser.add_argument("--client-processes", type=int, default=1, help="spread the streams over this many processes")
    parser.add_argument("--streams-per-channel", type=int, default=8, help="streams sharing one gRPC connection")
    parser.add_argument("--interval-ms", type=int, default=1000, help="interim_interval_ms; 0: no interims")
    parser.add_argument(
        "--switch-interval-ms", type=float, help="--serve: run the server with sys.setswitchinterval(this)"
    )
    parser.add_argument("--language", default="", help="force a language (skips detection)")
    parser.add_argument("--speech", help="16 kHz mono WAV to stream instead of espeak-ng sentences")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument(
        "--results-json",
        help="append one object per level to this JSON list (bench/results/h200-streaming.json's shape)",
    )
    parser.add_argument("--label", help="--results-json: the model's name (default: the server's model id)")
    parser.add_argument(
        "--target-front-processes",
        type=int,
        default=0,
        help="--target: the server's --front-processes, recorded in --json and --results-json (unknown otherwise)",
    )
    parser.add_argument("--commit", help="--results-json: the commit measured (default: git rev-parse HEAD)")
    parser.add_argument("--write-speech", help="write the espeak-ng recording as a 16 kHz WAV (for --speech) and exit")
    args = parser.parse_args()

    import grpc

    from qwenasr.v1 import asr_pb2 as pb
    from qwenasr.v1 import asr_pb2_grpc as pb_grpc

    speech = load_speech(args.speech)
    if args.write_speech:
        import soundfile

        soundfile.write(args.write_speech, speech, 16000, subtype="FLOAT")
        return args, []
    pcm = (np.clip(np.round(speech * 32767), -32768, 32767).astype("<i2")).tobytes()
    rows: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        target = args.target
        if target is None and args.serve:
            target, args.server_pid = stack.enter_context(server_process(args.serve, args.switch_interval_ms))
        elif target is None:
            target = await stack.enter_async_context(in_process_server(args))
        channel = grpc.aio.insecure_channel(target)
        stack.push_async_callback(channel.close)
        stub = pb_grpc.AsrServiceStub(channel)
        info = await stub.GetServerInfo(pb.GetServerInfoRequest())
        args.model_id = info.model_id
        print(f"server {target}: model {info.model_id}; {len(speech) / 16000:.0f} s of speech looped", flush=True)
        if args.warmup_streams:
            # Not recorded: a fresh server's first seconds (each front's first streams, the engine's first
            # shapes) are not what a level measures.
            warm = argparse.Namespace(**{**vars(args), "duration_s": args.warmup_s})
            print("warm-up:", end=" ", flush=True)
            await run_level(target, pcm, args.warmup_streams, warm)
        for streams in (int(s) for s in args.streams.split(",")):
            rows.append(await run_level(target, pcm, streams, args))
    return args, rows


@contextlib.contextmanager
def server_process(flags: str, switch_interval_ms: float | None = None) -> Iterator[tuple[str, int]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    paths = [str(REPO / "server"), str(REPO / "gen" / "python"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    command = [sys.executable, "-m", "asr_server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if switch_interval_ms is not None:
        # How long a thread may hold the GIL while another waits: the engine thread against the event loop.
        wrapper = (
            f"import sys, runpy; sys.setswitchinterval({switch_interval_ms / 1000}); "
            "sys.argv = ['asr-server', *sys.argv[1:]]; runpy.run_module('asr_server.cli', run_name='__main__')"
        )
        command[1:3] = ["-c", wrapper]
    log = open(Path(tempfile.gettempdir()) / f"streaming_server_{port}.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen([*command, *flags.split()], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        for _ in range(600):
            if process.poll() is not None:
                raise SystemExit(f"the server exited: see {log.name}")
            if "asr-server: serving" in Path(log.name).read_text():
                break
            time.sleep(0.5)
        else:
            raise SystemExit(f"the server did not start in 300 s: see {log.name}")
        yield f"127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


@contextlib.asynccontextmanager
async def in_process_server(args: argparse.Namespace) -> AsyncIterator[str]:
    from asr_server.config import Config, EngineConfig, ModelConfig, ServerConfig
    from asr_server.edge.server import AsrServer

    engine = "transformers" if args.model else args.engine
    config = Config(
        server=ServerConfig(host="127.0.0.1", port=0, grace_period_s=2.0),
        model=ModelConfig(model=args.model or "fake", device="cpu"),
        engine=EngineConfig(kind=engine, max_batch_wait_ms=2.0, max_inference_batch_size=64),  # type: ignore[arg-type]
    )
    server = AsrServer(config)
    await server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop(grace_s=1.0)


# A level holds real time when every final arrived and the decode after the endpoint stays within this at p99.
REAL_TIME_DECODE_P99_MS = 400


def front_processes(serve_flags: str | None) -> int | None:
    """--serve's --front-processes (1 when not given); None for a server this script did not start."""
    if not serve_flags:
        return None
    flags = serve_flags.split()
    return int(flags[flags.index("--front-processes") + 1]) if "--front-processes" in flags else 1


def result_object(row: dict[str, Any], *, model: str, commit: str, date: str) -> dict[str, Any]:
    """One level as bench/results/h200-streaming.json records it."""
    decode, final, interim = row["final_decode_ms"], row["final_ms"], row["interim_ms"]
    return {
        "model": model,
        "streams": row["streams"],
        "finals_expected": row["finals_expected"],
        "finals": row["finals"],
        "decode_ms": {"p50": decode[50], "p90": decode[90], "p99": decode[99]},
        "final_after_speech_ms": {"p50": final[50], "p99": final[99]},
        "interim_ms": {"p50": interim[50], "p99": interim[99]},
        "interims": row["interims"],
        "real_time_held": bool(
            row["errors"] == 0
            and row["finals"] >= row["finals_expected"]  # a pause may split one utterance in two
            and decode[99] is not None
            and decode[99] <= REAL_TIME_DECODE_P99_MS
        ),
        "front_processes": row.get("front_processes"),
        "client_processes": row.get("client_processes"),
        "duration_s": row["duration_s"],
        "gpu_busy_pct": row.get("gpu_busy_pct"),
        "host_cpu": row.get("host_cpu"),
        "date": date,
        "commit": commit,
    }


def current_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"  # e.g. a copy of the tree without .git (the GPU host): pass --commit
    return done.stdout.strip()


def append_results(path: Path, objects: list[dict[str, Any]]) -> None:
    existing: list[dict[str, Any]] = []
    if path.exists() and path.read_text().strip():
        loaded = json.loads(path.read_text())
        if not isinstance(loaded, list):
            raise SystemExit(f"{path}: expected a JSON list, found {type(loaded).__name__}")
        existing = loaded
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing + objects, indent=2) + "\n")


if __name__ == "__main__":
    parsed, table = asyncio.run(main())
    if parsed.json:
        Path(parsed.json).write_text(json.dumps({"args": vars(parsed), "rows": table}, indent=2))
    if parsed.results_json and table:
        model = parsed.label or getattr(parsed, "model_id", "") or "unknown"
        commit = parsed.commit or current_commit()
        date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        objects = [result_object(r, model=model, commit=commit, date=date) for r in table]
        append_results(Path(parsed.results_json), objects)
        print(f"appended {len(table)} results to {parsed.results_json}", flush=True)
