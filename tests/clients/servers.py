"""Servers for the client tests: the real server in a background thread (so blocking clients can call it), a stub
aligner, a fake StreamingRecognize servicer, and the `asr-server` command in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr_server.config import Config
from asr_server.edge.server import AsrServer
from asr_server.engine.core import EngineCore
from asr_server.results import Word
from asr_server.transcription import AlignmentResult
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]


class StubAligner:
    """Gives word i of n the i-th n-th of the audio, in whole milliseconds."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def align(self, audio_16k: npt.NDArray[np.float32], text: str, language: str) -> AlignmentResult:
        self.calls.append((text, language))
        words = text.split()
        duration_ms = audio_16k.shape[0] * 1000 // 16_000
        step = duration_ms // max(len(words), 1)
        return AlignmentResult(
            tuple(Word(w, i * step, (i + 1) * step - 10) for i, w in enumerate(words)), alignment_ms=1.0
        )


def stub_word_times(text: str, duration_ms: int) -> list[tuple[str, float, float]]:
    """What StubAligner gives for `text` over audio of `duration_ms`, in seconds."""
    words = text.split()
    step = duration_ms // max(len(words), 1)
    return [(w, i * step / 1000, ((i + 1) * step - 10) / 1000) for i, w in enumerate(words)]


@contextlib.contextmanager
def threaded_server(
    config: Config,
    *,
    core_factory: Callable[[], EngineCore] | None = None,
    aligner: StubAligner | None = None,
) -> Iterator[tuple[AsrServer, str]]:
    """The real AsrServer on its own event loop in a thread; yields it and its "127.0.0.1:port" target."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="asr-test-server", daemon=True)
    thread.start()
    server = AsrServer(config, core_factory=core_factory, aligner=aligner)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
        yield server, f"127.0.0.1:{server.port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace_s=0.5), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


class FakeLiveServicer(pb_grpc.AsrServiceServicer):
    """StreamingRecognize as the contract describes it, without a model: an interim result every
    `interim_every_ms` of audio received ("heard N ms"), a final one with every received byte counted when the
    client half-closes, word timestamps when asked. Records when each audio message arrived."""

    def __init__(self, interim_every_ms: int = 200) -> None:
        self.interim_every_ms = interim_every_ms
        self.configs: list[pb.StreamingRecognitionConfig] = []
        self.arrivals: list[tuple[float, int]] = []
        self.received = bytearray()

    def StreamingRecognize(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[pb.StreamingRecognizeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.StreamingRecognizeResponse]:
        first = next(request_iterator)
        if first.WhichOneof("payload") != "config":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must carry config")
        self.configs.append(first.config)
        fmt = first.config.config.audio_format
        width = {pb.AUDIO_ENCODING_LINEAR16: 2, pb.AUDIO_ENCODING_FLOAT32: 4, pb.AUDIO_ENCODING_MULAW: 1,
                 pb.AUDIO_ENCODING_ALAW: 1}[fmt.encoding]
        bytes_per_ms = fmt.sample_rate_hz * fmt.channel_count * width / 1000
        language = first.config.config.language or "English"
        next_interim_ms = self.interim_every_ms
        for request in request_iterator:
            self.arrivals.append((time.monotonic(), len(request.audio)))
            self.received += request.audio
            heard_ms = int(len(self.received) / bytes_per_ms)
            if first.config.interim_results and heard_ms >= next_interim_ms:
                next_interim_ms += self.interim_every_ms
                yield pb.StreamingRecognizeResponse(
                    result=pb.StreamingResult(text=f"heard {heard_ms} ms", language=language, stability=0.5,
                                              end_ms=heard_ms),
                    processed_audio_ms=heard_ms,
                )
        heard_ms = int(len(self.received) / bytes_per_ms)
        yield pb.StreamingRecognizeResponse(
            speech_event=pb.SpeechEvent(type=pb.SPEECH_EVENT_TYPE_SPEECH_ENDED, offset_ms=heard_ms)
        )
        words = [pb.Word(text="heard", start_ms=0, end_ms=heard_ms // 2),
                 pb.Word(text="everything", start_ms=heard_ms // 2, end_ms=heard_ms)]
        yield pb.StreamingRecognizeResponse(
            result=pb.StreamingResult(
                is_final=True, text=f"final {len(self.received)} bytes", language=language, stability=1.0,
                start_ms=0, end_ms=heard_ms,
                words=words if first.config.config.return_word_timestamps else [],
            ),
            processed_audio_ms=heard_ms,
        )


class OldServerServicer(pb_grpc.AsrServiceServicer):
    """A server from before StreamingRecognize: it answers UNIMPLEMENTED, as the first versions did."""

    def StreamingRecognize(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[pb.StreamingRecognizeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.StreamingRecognizeResponse]:
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "StreamingRecognize is not served by this server version yet; use TranscribeStream for recorded audio",
        )
        yield pb.StreamingRecognizeResponse()  # pragma: no cover - abort raises

    def GetServerInfo(  # noqa: N802 - gRPC method name
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetServerInfoResponse:
        return pb.GetServerInfoResponse(api_version="qwenasr.v1", features=pb.ServerFeatures(streaming_recognize=False))


class StreamRefusingServicer(pb_grpc.AsrServiceServicer):
    """Transcribe answers; TranscribeStream ends every call at once with FAILED_PRECONDITION without reading the
    upload, so a client is still sending its frames when the status arrives (grpc-go's Send then says io.EOF)."""

    MESSAGE = "this test server refuses every TranscribeStream"

    def Transcribe(  # noqa: N802 - gRPC method name
        self, request: pb.TranscribeRequest, context: grpc.ServicerContext
    ) -> pb.TranscribeResponse:
        return pb.TranscribeResponse(transcripts=[pb.Transcript(text="unary works", language="English")])

    def TranscribeStream(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[pb.TranscribeStreamRequest], context: grpc.ServicerContext
    ) -> pb.TranscribeResponse:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.MESSAGE)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover


class FlakyServicer(pb_grpc.AsrServiceServicer):
    """A server that fails the first `failures` calls of Transcribe and of TranscribeStream with `code` (UNAVAILABLE:
    a replica restarting), then answers "attempt N" (N counts that method's calls from 1). Records every attempt."""

    def __init__(self, failures: int = 1, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 pushback_ms: str | None = None) -> None:
        self.failures = failures
        self.code = code
        self.pushback_ms = pushback_ms
        self.attempts: dict[str, int] = {"Transcribe": 0, "TranscribeStream": 0}
        self._lock = threading.Lock()

    def _attempt(self, method: str, context: grpc.ServicerContext) -> pb.TranscribeResponse:
        with self._lock:
            self.attempts[method] += 1
            attempt = self.attempts[method]
        if attempt <= self.failures:
            if self.pushback_ms is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", self.pushback_ms),))
            context.abort(self.code, f"{method} attempt {attempt} fails on purpose")
        return pb.TranscribeResponse(transcripts=[pb.Transcript(text=f"attempt {attempt}", language="English")],
                                     audio_duration_ms=1000)

    def Transcribe(  # noqa: N802 - gRPC method name
        self, request: pb.TranscribeRequest, context: grpc.ServicerContext
    ) -> pb.TranscribeResponse:
        return self._attempt("Transcribe", context)

    def TranscribeStream(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[pb.TranscribeStreamRequest], context: grpc.ServicerContext
    ) -> pb.TranscribeResponse:
        for _ in request_iterator:
            pass
        return self._attempt("TranscribeStream", context)


@contextlib.contextmanager
def fake_live_server(servicer: pb_grpc.AsrServiceServicer, *, health: bool = False) -> Iterator[str]:
    """`servicer` on a threaded grpc server; with `health`, also a Health service that answers SERVING."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_AsrServiceServicer_to_server(servicer, server)
    if health:
        health_servicer = grpc_health.HealthServicer()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@dataclass
class ServerProcess:
    """A running `asr-server serve`: its address, the process, and what it wrote to stderr so far."""

    address: str
    process: subprocess.Popen[str]
    _stderr: IO[str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        self._stderr.flush()
        with open(self._stderr.name, encoding="utf-8", errors="replace") as again:
            return again.read()


@contextlib.contextmanager
def server_process(*args: str, startup_timeout_s: float = 240.0) -> Iterator[str]:
    """`asr-server serve --port 0 ARGS` in a subprocess; yields "127.0.0.1:port" once it prints its port.

    Its stderr goes to a file (a pipe nobody reads could fill and stall the server) and is shown on failure."""
    with running_server_process(*args, startup_timeout_s=startup_timeout_s) as server:
        yield server.address


@contextlib.contextmanager
def running_server_process(
    *args: str, startup_timeout_s: float = 240.0, log_level: str = "WARNING"
) -> Iterator[ServerProcess]:
    """As server_process, yielding the ServerProcess (its pid, its stderr; a test may SIGTERM it itself)."""
    command = [sys.executable, "-m", "asr_server.cli", "--log-level", log_level, "serve", "--host", "127.0.0.1",
               "--port", "0", *args]
    with tempfile.NamedTemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO_ROOT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        ports: queue.Queue[int] = queue.Queue()

        def read_stdout() -> None:  # drains stdout for the server's whole life
            assert process.stdout is not None
            for line in process.stdout:
                match = re.search(r"on port (\d+)", line)
                if match:
                    ports.put(int(match.group(1)))
            ports.put(0)  # the server exited

        threading.Thread(target=read_stdout, daemon=True).start()
        try:
            try:
                port = ports.get(timeout=startup_timeout_s)
            except queue.Empty:
                port = 0
            if not port:
                stderr.seek(0)
                raise RuntimeError(f"asr-server did not start ({' '.join(args)}):\n{stderr.read()[-4000:]}")
            yield ServerProcess(f"127.0.0.1:{port}", process, stderr)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
