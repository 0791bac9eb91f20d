"""Prometheus metrics on their own port and the access log, after a mix of good and failing calls (fake engine)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asr_server.logs import ACCESS_LOGGER, JsonFormatter
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, wav_bytes, with_limits, with_server
from tests.streaming_helpers import stream_config


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    matching = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    return sum(matching)


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_a_scrape_after_good_and_failing_calls_shows_the_counters_histogram_and_gauges() -> None:
    config = with_server(
        with_limits(fake_config(fake_batch_delay_ms=300, max_queued_requests=1), max_audio_duration_s=60),
        metrics_port=_free_port(),
    )
    async with running_server(config) as (server, channel):
        assert server.metrics_port == config.server.metrics_port
        stub = pb_grpc.AsrServiceStub(channel)
        for seed in (1, 2):
            assert await _code(stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0, seed=seed))))) == (
                grpc.StatusCode.OK
            )
        assert await _code(stub.Transcribe(pb.TranscribeRequest(audio=b"not audio"))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        too_long = wav_bytes(tone(61.0))
        assert await _code(stub.Transcribe(pb.TranscribeRequest(audio=too_long))) == grpc.StatusCode.RESOURCE_EXHAUSTED
        await stub.GetServerInfo(pb.GetServerInfoRequest())
        # One call holds the engine's only queue place; a second is refused for capacity; the scrape meanwhile
        # reads the engine's queue at that moment.
        held = asyncio.ensure_future(stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0, seed=3)))))
        async with asyncio.timeout(10):
            while server.engine.in_flight == 0:
                await asyncio.sleep(0.01)
        assert await _code(stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0))))) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        during = await asyncio.to_thread(_scrape, server.metrics_port)
        await held
        after = await asyncio.to_thread(_scrape, server.metrics_port)

    transcribe = {"grpc_service": "qwenasr.v1.AsrService", "grpc_method": "Transcribe", "grpc_type": "unary"}
    assert _value(during, "asr_engine_in_flight_requests", replica="0") == 1
    assert _value(during, "asr_live_streams") == 0
    assert _value(after, "asr_engine_in_flight_requests", replica="0") == 0
    assert _value(after, "grpc_server_started_total", **transcribe) == 6
    assert _value(after, "grpc_server_handled_total", grpc_code="OK", **transcribe) == 3
    assert _value(after, "grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **transcribe) == 1
    assert _value(after, "grpc_server_handled_total", grpc_code="RESOURCE_EXHAUSTED", **transcribe) == 2
    assert _value(after, "grpc_server_handled_total", grpc_method="GetServerInfo", grpc_code="OK") == 1
    assert _value(after, "grpc_server_handling_seconds_count", **transcribe) == 6
    # The slow calls took 300 ms each: they are above the 0.25 s bucket.
    assert _value(after, "grpc_server_handling_seconds_bucket", le="0.25", **transcribe) <= 3
    assert _value(after, "grpc_server_msg_received_total", **transcribe) == 6
    assert _value(after, "asr_audio_seconds_total", grpc_method="Transcribe") == pytest.approx(3.0, abs=0.01)
    assert _value(after, "asr_refused_total", grpc_code="RESOURCE_EXHAUSTED", reason="limit") == 1
    assert _value(after, "asr_refused_total", grpc_code="RESOURCE_EXHAUSTED", reason="capacity") == 1


async def test_the_metrics_port_closes_with_the_server_and_is_off_by_default() -> None:
    port = _free_port()
    async with running_server(with_server(fake_config(), metrics_port=port)) as (server, _):
        assert server.metrics_port == port
    with pytest.raises(OSError):
        await asyncio.to_thread(_scrape, port)
    async with running_server(fake_config()) as (server, _):
        assert server.metrics_port == 0


async def test_auth_refusals_and_drain_refusals_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with running_server(with_server(fake_config(), auth_token="s3cret")) as (server, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        code = await _code(stub.GetServerInfo(pb.GetServerInfoRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", "Bearer s3cret"), ("x-request-id", "req-42"))
        ok = await _code(stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(0.5))), metadata=metadata))
        assert ok == grpc.StatusCode.OK
        handled = server.metrics.registry.get_sample_value(
            "grpc_server_handled_total",
            {"grpc_service": "qwenasr.v1.AsrService", "grpc_method": "GetServerInfo", "grpc_type": "unary",
             "grpc_code": "UNAUTHENTICATED"},
        )
        assert handled == 1
    lines = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(lines) == 2, [r.getMessage() for r in lines]
    refused, served = (r.getMessage() for r in lines)
    assert "method=GetServerInfo" in refused and "code=UNAUTHENTICATED" in refused
    assert "bearer token" in refused  # the status message is in the line
    assert "method=Transcribe" in served and "code=OK" in served and "request_id=req-42" in served
    assert "audio_ms=500" in served and "peer=ipv4:127.0.0.1:" in served
    request_bytes = int(served.split("request_bytes=")[1].split()[0])
    assert request_bytes > len(wav_bytes(tone(0.5)))  # the audio plus the protobuf framing
    assert "duration_ms=" in served


async def test_json_access_lines_are_one_object_each_and_carry_the_fields() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    access = logging.getLogger(ACCESS_LOGGER)
    keep = Keep()
    access.addHandler(keep)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        async with running_server(fake_config()) as (_, channel):
            stub = pb_grpc.AsrServiceStub(channel)
            await _code(stub.Transcribe(pb.TranscribeRequest(audio=b"\x00garbage")))
    finally:
        access.removeHandler(keep)
        access.setLevel(old_level)
    (line,) = (JsonFormatter().format(r) for r in records)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["logger"] == ACCESS_LOGGER and entry["level"] == "INFO"
    assert entry["method"] == "Transcribe" and entry["code"] == "INVALID_ARGUMENT"
    assert entry["request_bytes"] > 0 and entry["duration_ms"] >= 0 and entry["audio_ms"] == 0
    assert "could not be read" in entry["status_message"]
    assert len(entry["request_id"]) == 16


def test_json_lines_keep_a_traceback_inside_the_object() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("asr_server.x", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
        import sys

        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed here"
    assert entry["exception"].startswith("Traceback") and "ValueError: boom\nsecond line" in entry["exception"]


def test_config_reads_the_metrics_port_and_refuses_a_clash() -> None:
    from asr_server.config import ConfigError, parse_serve_config

    assert parse_serve_config([], {"ASR_METRICS_PORT": "9100"}).server.metrics_port == 9100
    assert parse_serve_config([], {}).server.metrics_port == 0
    with pytest.raises(ConfigError, match="--metrics-port"):
        parse_serve_config(["--metrics-port", "50051", "--port", "50051"], {})
    assert dataclasses.replace(fake_config()).server.metrics_port == 0


async def test_a_live_stream_is_counted_open_then_its_audio_and_final_delay_recorded() -> None:
    opened = asyncio.Event()
    release = asyncio.Event()

    async def requests():  # type: ignore[no-untyped-def]
        yield stream_config()
        yield pb.StreamingRecognizeRequest(audio=bytes(32000))  # 1 s of LINEAR16 silence
        opened.set()
        await release.wait()

    async with running_server(fake_config()) as (server, channel):
        call = pb_grpc.AsrServiceStub(channel).StreamingRecognize(requests())
        collected = asyncio.ensure_future(_drain(call))
        await opened.wait()
        async with asyncio.timeout(10):
            while server.metrics.registry.get_sample_value("asr_live_streams") != 1:
                await asyncio.sleep(0.01)
        release.set()
        assert await collected == grpc.StatusCode.OK
        registry = server.metrics.registry
        assert registry.get_sample_value("asr_live_streams") == 0
        assert registry.get_sample_value("asr_stream_final_delay_seconds_count") == 1
        # What the stream processed: its 1 s in whole VAD frames.
        assert registry.get_sample_value("asr_audio_seconds_total", {"grpc_method": "StreamingRecognize"}) == (
            pytest.approx(1.0, abs=0.05)
        )
        labels = {"grpc_service": "qwenasr.v1.AsrService", "grpc_method": "StreamingRecognize",
                  "grpc_type": "bidi_stream"}
        assert registry.get_sample_value("grpc_server_msg_received_total", labels) == 2


async def _drain(call: grpc.aio.StreamStreamCall) -> grpc.StatusCode:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK
