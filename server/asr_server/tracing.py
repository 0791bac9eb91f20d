"""OpenTelemetry: the SDK set up by flag, and one span per RPC continuing the caller's W3C trace.

Spans carry sizes and timings only: never audio, never text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.trace import Span, SpanKind

from asr_server.config import TracingConfig

SERVICE = "qwenasr.v1.AsrService"
_tracer = trace.get_tracer("asr_server.edge")


def setup_tracing(config: TracingConfig) -> TracerProvider | None:
    """Installs the global tracer provider for the chosen exporter; "none" leaves the global one alone."""
    if config.exporter == "none":
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    if config.exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
    trace.set_tracer_provider(provider)
    return provider


@contextlib.contextmanager
def rpc_span(method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> Iterator[Span]:
    """A SERVER span for one RPC, child of the caller's span when it sent a W3C traceparent."""
    carrier = {key: value for key, value in (metadata or ()) if isinstance(value, str)}
    parent = extract(carrier)
    with _tracer.start_as_current_span(
        f"{SERVICE}/{method}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method},
    ) as span:
        yield span


@contextlib.contextmanager
def http_span(method: str, route: str, headers: Mapping[str, str]) -> Iterator[Span]:
    """A SERVER span for one HTTP request (the OpenAI-compatible front), child of the caller's W3C traceparent."""
    parent = extract(dict(headers))
    with _tracer.start_as_current_span(
        f"{method} {route}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "http.route": route},
    ) as span:
        yield span
