"""Spans: one SERVER span per RPC continuing the caller's trace, child spans for queue wait and batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, wav_bytes, with_limits


class _WindowedExporter(InMemorySpanExporter):
    """Keeps spans only while a test of this module runs.

    The global provider can be set once per process, so it outlives this module: an exporter that kept recording
    would hold every span of every later test (the two-hour streaming test saw that as a 17 MB "leak").
    """

    recording = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self.recording:
            return SpanExportResult.SUCCESS
        return super().export(spans)


_exporter = _WindowedExporter()


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    _exporter.clear()
    _exporter.recording = True
    try:
        yield _exporter
    finally:
        _exporter.recording = False
        _exporter.clear()


async def test_span_tree_continues_the_callers_trace_and_holds_no_text(exporter: InMemorySpanExporter) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    async with running_server(with_limits(fake_config(), max_chunk_s=30)) as (_, channel):
        # 70 s of audio in chunks of at most 30 s: three queue-wait and three batch spans.
        request = pb.TranscribeRequest(audio=wav_bytes(tone(70.0, seed=5)), config=pb.RecognitionConfig(context="x"))
        response = await pb_grpc.AsrServiceStub(channel).Transcribe(request, metadata=[("traceparent", traceparent)])
    assert response.transcripts[0].text
    spans = exporter.get_finished_spans()
    (rpc,) = [s for s in spans if s.name == "qwenasr.v1.AsrService/Transcribe"]
    assert rpc.kind == SpanKind.SERVER
    assert format(rpc.context.trace_id, "032x") == trace_id
    assert rpc.parent is not None and format(rpc.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert rpc.attributes["rpc.method"] == "Transcribe"
    children = [s for s in spans if s.parent is not None and s.parent.span_id == rpc.context.span_id]
    names = sorted(s.name for s in children)
    assert names.count("asr.queue_wait") == 3
    assert names.count("asr.engine_batch") == names.count("asr.queue_wait")
    batch = next(s for s in children if s.name == "asr.engine_batch")
    assert batch.attributes["asr.batch.size"] >= 1
    assert batch.attributes["asr.batch.audio_s"] > 0
    assert batch.attributes["asr.request.generated_tokens"] >= 1
    for span in spans:
        for value in (span.attributes or {}).values():
            assert not (isinstance(value, str) and response.transcripts[0].text[:8] in value), span.name
