"""`--tracing otlp` and `--tracing console` as a deployment uses them: a real server process, its spans received by
an OTLP collector (a stand-in gRPC TraceService) or printed, and flushed on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import tone, wav_bytes


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []  # (service.name, span name)

    async def Export(  # noqa: N802 - gRPC method name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                self.spans.extend((attributes.get("service.name", ""), s.name) for s in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@asynccontextmanager
async def _collector() -> AsyncIterator[tuple[_Collector, int]]:
    collector = _Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield collector, port
    finally:
        await server.stop(0)


@contextmanager
def _server(*flags: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "asr_server.cli", "serve", "--engine", "fake", "--host", "127.0.0.1", "--port", "0",
         "--no-warmup", "--grace-period-s", "5", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def _transcribe_then_stop(process: subprocess.Popen[str]) -> str:
    """One Transcribe, then SIGTERM; returns what the server printed on stdout after its port line."""
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60)  # type: ignore[union-attr]
    match = re.search(r"on port (\d+)", line)
    assert match, f"no port line: {line!r}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
        response = await pb_grpc.AsrServiceStub(channel).Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0))))
    assert response.transcripts[0].text
    process.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(asyncio.to_thread(process.communicate), 30)
    assert process.returncode == 0, err[-3000:]
    return out


async def test_otlp_spans_reach_the_collector_with_the_service_name() -> None:
    async with _collector() as (collector, port):
        with _server("--tracing", "otlp", "--otlp-endpoint", f"http://127.0.0.1:{port}", "--service-name", "asr-test") as process:
            await _transcribe_then_stop(process)
        # The batch exporter sends on shutdown (the server flushes its provider before exiting).
        names = {name for service, name in collector.spans if service == "asr-test"}
    assert {"qwenasr.v1.AsrService/Transcribe", "asr.queue_wait", "asr.engine_batch"} <= names, collector.spans


async def test_console_spans_are_printed() -> None:
    with _server("--tracing", "console") as process:
        out = await _transcribe_then_stop(process)
    assert '"name": "qwenasr.v1.AsrService/Transcribe"' in out
    assert '"service.name": "qwen-asr-server"' in out
