"""The OpenAI-compatible HTTP front (--http-port), driven by the official `openai` SDK against the real server.

On the tiny checkpoint: every response format, with language and prompt, word and segment granularities, and
stream=True; each text equals what the gRPC Transcribe of the same server answers for the same audio and options.
On the fake engine: bad input and refusals answer the right status with OpenAI's error body, and good requests
running beside them still succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import openai
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import generate_latest

from asr_server.config import Config, ContinuousConfig, EngineConfig, ModelConfig
from asr_server.edge.server import AsrServer
from asr_server.engine.fake import FakeEngine
from asr_server.models.tiny_checkpoint import TinyCheckpoints
from asr_server.results import Word
from asr_server.transcription import AlignBackend, AlignmentResult
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, wav_bytes, with_limits, with_server
from tests.integration.test_metrics_access_log import _free_port, _scrape
from tests.integration.test_tls import Pki, pki, tls_config  # noqa: F401 - pki: the fixture
from tests.integration.test_tracing import exporter  # noqa: F401 - the fixture

TOKEN = "s3cret"


class EvenAligner:
    """An aligner double: the text's words spread evenly over the audio it is given."""

    async def align(self, audio_16k: np.ndarray, text: str, language: str) -> AlignmentResult:
        words = text.split()
        step_ms = audio_16k.shape[0] * 1000 // 16_000 // max(1, len(words))
        return AlignmentResult(tuple(Word(w, i * step_ms, (i + 1) * step_ms) for i, w in enumerate(words)), 1.0)


def speechlike(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    voiced = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) * (1 + np.sin(2 * np.pi * rng.uniform(2, 6) * t))
    return (voiced + 0.02 * rng.standard_normal(n)).astype(np.float32)


@contextlib.asynccontextmanager
async def http_server(
    config: Config, *, aligner: AlignBackend | None = None, token: str = ""
) -> AsyncIterator[tuple[AsrServer, pb_grpc.AsrServiceStub, openai.AsyncOpenAI]]:
    config = with_server(config, http_port=0, auth_token=token)
    async with running_server(config, aligner=aligner) as (server, channel):
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=token or "unused", max_retries=0
        )
        try:
            yield server, pb_grpc.AsrServiceStub(channel), client
        finally:
            await client.close()


def raw_request(
    port: int,
    method: str,
    path: str,
    *,
    fields: dict[str, str] | None = None,
    json_body: object = None,
    token: str = "",
    file: tuple[str, bytes] | None = None,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, Any]]:
    """One request by the standard library (for what the SDK will not send: a form without a file, JSON), blocking:
    run it in a thread. Returns the status and the JSON body."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data: bytes | None = None
    if json_body is not None:
        data, headers["Content-Type"] = json.dumps(json_body).encode(), "application/json"
    elif fields is not None or file is not None:
        boundary = "----asr-test-boundary"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in (fields or {}).items()
        ]
        if file is not None:
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file[0]}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n".encode()
                + file[1]
                + b"\r\n"
            )
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    scheme = "https" if tls is not None else "http"
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{port}{path}", data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30, context=tls) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def tiny_config(model: str) -> Config:
    engine = EngineConfig(
        kind="continuous",
        max_batch_wait_ms=0.0,
        default_max_new_tokens=12,
        continuous=ContinuousConfig(max_running=4, kv_cache_tokens=4096),
        warmup=False,
    )
    return dataclasses.replace(
        fake_config(), model=ModelConfig(model=model, device="cpu", dtype="float32"), engine=engine
    )


async def grpc_transcript(
    stub: pb_grpc.AsrServiceStub, audio: bytes, *, language: str = "", context: str = "", words: bool = False
) -> pb.Transcript:
    config = pb.RecognitionConfig(language=language, context=context, return_word_timestamps=words)
    response = await stub.Transcribe(pb.TranscribeRequest(config=config, audio=audio))
    return response.transcripts[0]


def cue_texts(subtitles: str) -> list[str]:
    """The text lines of SRT or WebVTT cues (neither numbers, nor times, nor the WEBVTT header)."""
    lines = [line for line in subtitles.splitlines() if line and line != "WEBVTT"]
    return [line for line in lines if "-->" not in line and not line.isdigit()]


async def test_every_format_equals_grpc_transcribe_on_the_tiny_checkpoint(tiny_checkpoints: TinyCheckpoints) -> None:
    # 2.5 s of speech-like sound, a second of silence, 2.5 s more: short enough for one piece (one segment).
    clip = np.concatenate([speechlike(2.5, seed=3), np.zeros(16000, np.float32), speechlike(2.5, seed=4)])
    audio = wav_bytes(clip)
    async with http_server(tiny_config(str(tiny_checkpoints.asr_hf)), aligner=EvenAligner()) as (_, stub, client):
        file = ("clip.wav", audio, "audio/wav")
        plain = await grpc_transcript(stub, audio)
        # Random weights: the text is whatever the tiny model generates; it must be the same on both fronts.
        as_json = await client.audio.transcriptions.create(model="tiny", file=file)
        assert as_json.text == plain.text
        as_text = await client.audio.transcriptions.create(model="tiny", file=file, response_format="text")
        assert as_text == plain.text

        hinted = await grpc_transcript(stub, audio, language="en", context="Qwen, gRPC")
        verbose = await client.audio.transcriptions.create(
            model="tiny", file=file, language="en", prompt="Qwen, gRPC", response_format="verbose_json"
        )
        assert verbose.text == hinted.text
        assert verbose.language == "english" and verbose.duration == pytest.approx(6.0)
        # Segments by default (OpenAI's default granularity), no words.
        assert verbose.segments is not None and verbose.words is None
        assert [s.text for s in verbose.segments] == [s.text for s in hinted.segments if s.text.strip()]
        assert [(s.start, s.end) for s in verbose.segments] == [
            (s.start_ms / 1000, s.end_ms / 1000) for s in hinted.segments if s.text.strip()
        ]

        timed = await grpc_transcript(stub, audio, language="en", context="Qwen, gRPC", words=True)
        assert timed.words, "the aligner double times every word"
        both = await client.audio.transcriptions.create(
            model="tiny",
            file=file,
            language="en",
            prompt="Qwen, gRPC",
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
        )
        assert both.text == timed.text
        assert both.words is not None and both.segments is not None
        assert [(w.word, w.start, w.end) for w in both.words] == [
            (w.text, w.start_ms / 1000, w.end_ms / 1000) for w in timed.words
        ]
        words_only = await client.audio.transcriptions.create(
            model="tiny", file=file, language="en", response_format="verbose_json", timestamp_granularities=["word"]
        )
        assert words_only.segments is None and words_only.words

        srt = await client.audio.transcriptions.create(model="tiny", file=file, response_format="srt")
        vtt = await client.audio.transcriptions.create(model="tiny", file=file, response_format="vtt")
        spoken = [s for s in plain.segments if s.text.strip()]
        assert cue_texts(srt) == cue_texts(vtt) == [s.text.strip() for s in spoken]
        assert srt.startswith("1\n00:00:00,000 --> ") and vtt.startswith("WEBVTT\n\n00:00:00.000 --> ")

        stream = await client.audio.transcriptions.create(
            model="tiny", file=file, language="en", prompt="Qwen, gRPC", stream=True
        )
        events = [event async for event in stream]
        assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
        assert events[-1].type == "transcript.text.done" and events[-1].text == hinted.text
        assert "".join(e.delta for e in events[:-1]) == hinted.text

        models = await client.models.list()
        info = await stub.GetServerInfo(pb.GetServerInfoRequest())
        assert [m.id for m in models.data] == [info.model_id]
        assert (await client.models.retrieve(info.model_id)).id == info.model_id
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("whisper-1")


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}, body
    return body


async def test_bad_input_gets_openai_errors_while_good_requests_succeed() -> None:
    config = with_limits(fake_config(), max_message_bytes=256 * 1024)
    good_audio = wav_bytes(tone(2.0, seed=5))
    async with http_server(config, token=TOKEN) as (server, stub, client):
        expected = (await grpc_transcript_with_token(stub, good_audio)).text
        base = f"http://127.0.0.1:{server.http_port}"

        async def good() -> str:
            result = await client.audio.transcriptions.create(model="m", file=("a.wav", good_audio))
            return result.text

        async def not_audio() -> openai.APIStatusError:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.audio.transcriptions.create(model="m", file=("notes.txt", b"these are not sounds" * 50))
            return caught.value

        async def unknown_language() -> openai.APIStatusError:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.audio.transcriptions.create(model="m", file=("a.wav", good_audio), language="xx")
            return caught.value

        async def oversize() -> openai.APIStatusError:
            big = wav_bytes(tone(10.0, seed=6))  # 320 KB: over the 256 KiB limit
            with pytest.raises(openai.APIStatusError) as caught:
                await client.audio.transcriptions.create(model="m", file=("big.wav", big))
            return caught.value

        results = await asyncio.gather(*(good() for _ in range(6)), not_audio(), unknown_language(), oversize())
        assert results[:6] == [expected] * 6
        bad_file, bad_language, too_big = results[6:]
        assert isinstance(bad_file, openai.APIStatusError) and bad_file.status_code == 400
        assert error_of(bad_file)["param"] == "file" and error_of(bad_file)["type"] == "invalid_request_error"
        assert "could not be read" in error_of(bad_file)["message"]
        assert isinstance(bad_language, openai.APIStatusError) and bad_language.status_code == 400
        assert error_of(bad_language)["param"] == "language" and "'xx'" in error_of(bad_language)["message"]
        assert isinstance(too_big, openai.APIStatusError) and too_big.status_code == 413
        assert error_of(too_big)["code"] == "limit_exceeded"

        wrong = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as unauthorized:
            await wrong.audio.transcriptions.create(model="m", file=("a.wav", good_audio))
        assert unauthorized.value.status_code == 401 and error_of(unauthorized.value)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
        await wrong.close()

        port = server.http_port

        async def raw(method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
            return await asyncio.to_thread(raw_request, port, method, path, **kwargs)

        status, body = await raw("POST", "/v1/audio/transcriptions", fields={"model": "m"}, token=TOKEN)
        assert status == 400 and body["error"]["param"] == "file" and "'file' is missing" in body["error"]["message"]
        status, body = await raw("POST", "/v1/audio/transcriptions", json_body={"model": "m"}, token=TOKEN)
        assert status == 400 and "multipart/form-data" in body["error"]["message"]
        status, body = await raw(
            "POST",
            "/v1/audio/transcriptions",
            fields={"response_format": "xml"},
            file=("a.wav", good_audio),
            token=TOKEN,
        )
        assert status == 400 and body["error"]["param"] == "response_format"
        # Health needs no token, as the gRPC health service.
        assert await raw("GET", "/health") == (200, {"status": "serving"})
        status, body = await raw("GET", "/v1/audio/translations", token=TOKEN)
        assert status == 404 and body["error"]["code"] == "not_found"
        assert await good() == expected


async def grpc_transcript_with_token(stub: pb_grpc.AsrServiceStub, audio: bytes) -> pb.Transcript:
    response = await stub.Transcribe(
        pb.TranscribeRequest(audio=audio), metadata=(("authorization", f"Bearer {TOKEN}"),)
    )
    return response.transcripts[0]


async def test_a_full_queue_is_429_with_retry_after() -> None:
    config = fake_config(max_queued_requests=1, fake_batch_delay_ms=400.0, max_inference_batch_size=1)
    audio = wav_bytes(tone(1.0, seed=7))
    async with http_server(config) as (_, _, client):
        raw = client.audio.transcriptions.with_raw_response

        async def attempt() -> int | openai.APIStatusError:
            try:
                response = await raw.create(model="m", file=("a.wav", audio))
            except openai.RateLimitError as exc:
                return exc
            return response.http_response.status_code

        outcomes = await asyncio.gather(*(attempt() for _ in range(4)))
    refused = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
    assert 200 in outcomes and refused, outcomes
    assert all(o.status_code == 429 and int(o.response.headers["retry-after"]) >= 1 for o in refused)
    assert all(error_of(o)["code"] == "queue_full" for o in refused)


async def test_draining_answers_503_and_lets_the_running_request_finish() -> None:
    config = fake_config(fake_batch_delay_ms=1000.0)
    audio = wav_bytes(tone(1.0, seed=8))
    async with http_server(config) as (server, _, client):
        running = asyncio.create_task(client.audio.transcriptions.create(model="m", file=("a.wav", audio)))
        while server.in_flight_calls == 0:
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(server.stop(grace_s=5.0))
        with pytest.raises(openai.InternalServerError) as refused:
            await client.audio.transcriptions.create(model="m", file=("a.wav", audio))
        health = await asyncio.to_thread(raw_request, server.http_port, "GET", "/health")
        finished = await running
        await stopping
    assert refused.value.status_code == 503 and int(refused.value.response.headers["retry-after"]) >= 1
    assert "shutting down" in error_of(refused.value)["message"]
    assert health == (503, {"status": "draining"})
    assert finished.text


async def test_a_request_has_its_span_metrics_and_access_line(
    exporter: InMemorySpanExporter,  # noqa: F811 - the fixture imported above
    caplog: pytest.LogCaptureFixture,
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    audio = wav_bytes(tone(2.0, seed=9))
    caplog.set_level(logging.INFO, logger="asr_server.access")
    async with http_server(fake_config()) as (server, _, client):
        await client.audio.transcriptions.create(
            model="m",
            file=("a.wav", audio),
            extra_headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "x-request-id": "req-42"},
        )
        with pytest.raises(openai.BadRequestError):
            await client.audio.transcriptions.create(model="m", file=("a.wav", audio), language="xx")
        scrape = generate_latest(server.metrics.registry).decode()
    spans = [s for s in exporter.get_finished_spans() if s.name == "POST /v1/audio/transcriptions"]
    assert len(spans) == 2 and all(s.kind is SpanKind.SERVER for s in spans)
    good = next(s for s in spans if s.attributes is not None and s.attributes["http.response.status_code"] == 200)
    assert good.context is not None and f"{good.context.trace_id:032x}" == trace_id
    assert good.attributes is not None and good.attributes["asr.request_id"] == "req-42"
    batches = [s for s in exporter.get_finished_spans() if s.name == "asr.engine_batch"]
    assert any(b.parent is not None and b.parent.span_id == good.context.span_id for b in batches)
    route = 'route="/v1/audio/transcriptions"'
    assert f'asr_http_requests_total{{{route},status_code="200"}} 1.0' in scrape
    assert f'asr_http_requests_total{{{route},status_code="400"}} 1.0' in scrape
    assert 'asr_audio_seconds_total{grpc_method="/v1/audio/transcriptions"} 2.0' in scrape
    lines = [
        r.getMessage() for r in caplog.records if r.name == "asr_server.access" and r.getMessage().startswith("http ")
    ]
    assert len(lines) == 2 and "status_code=200" in lines[0] and "request_id=req-42" in lines[0]
    assert "status_code=400" in lines[1] and "unknown language" in lines[1]


async def test_while_the_model_loads_health_and_requests_answer_503_starting() -> None:
    release = threading.Event()

    def slow_load() -> FakeEngine:
        release.wait(10)
        return FakeEngine(max_batch_size=4)

    server = AsrServer(with_server(fake_config(), http_port=0), core_factory=slow_load)
    starting = asyncio.create_task(server.start())
    try:
        while server.http_port == 0:
            await asyncio.sleep(0.01)
        port = server.http_port
        assert await asyncio.to_thread(raw_request, port, "GET", "/health") == (503, {"status": "starting"})
        status, body = await asyncio.to_thread(
            raw_request, port, "POST", "/v1/audio/transcriptions", file=("a.wav", wav_bytes(tone(1.0)))
        )
        assert status == 503 and "starting" in body["error"]["message"] and body["error"]["type"] == "server_error"
        release.set()
        await starting
        assert await asyncio.to_thread(raw_request, port, "GET", "/health") == (200, {"status": "serving"})
    finally:
        release.set()
        await server.stop(grace_s=1.0)


async def test_sigterm_lets_the_http_request_in_flight_finish_and_exits_cleanly() -> None:
    # uvicorn's own serve() would replace the server's SIGTERM handler; the front must leave it alone.
    metrics_port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "asr_server.cli", "serve", "--engine", "fake", "--host", "127.0.0.1", "--port", "0",
         "--http-port", "0", "--metrics-port", str(metrics_port), "--fake-batch-delay-ms", "1500",
         "--grace-period-s", "10", "--no-warmup"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    try:
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60)  # type: ignore[union-attr]
        match = re.search(r"http port (\d+)", line)
        if match is None:
            process.kill()
            raise AssertionError(f"no HTTP port in {line!r}; stderr:\n{process.communicate()[1][-4000:]}")
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{match.group(1)}/v1", api_key="x", max_retries=0)
        in_flight = asyncio.create_task(
            client.audio.transcriptions.create(model="m", file=("a.wav", wav_bytes(tone(1.0, seed=2))))
        )
        # SIGTERM once the request is in the engine (its batch takes 1.5 s).
        while _scrape(metrics_port).get(("asr_engine_in_flight_requests", frozenset({("replica", "0")})), 0) < 1:
            await asyncio.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        result = await in_flight
        assert result.text
        assert await asyncio.wait_for(asyncio.to_thread(process.wait), 30) == 0
        await client.close()
    finally:
        if process.poll() is None:
            process.kill()


async def test_a_client_that_goes_away_frees_its_queued_work() -> None:
    cores: list[FakeEngine] = []

    def factory() -> FakeEngine:
        cores.append(FakeEngine(max_batch_size=1, batch_delay_ms=3000))  # room for the disconnect under load
        return cores[-1]

    config = with_server(fake_config(max_inference_batch_size=1, max_batch_wait_ms=0), http_port=0)
    async with running_server(config, core_factory=factory) as (server, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        first = asyncio.ensure_future(stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0, seed=1)))))
        # The gRPC request is in the engine (and so in the first batch) before the HTTP one is sent: sent together,
        # the HTTP piece could take the first batch itself (it then ran, and the test counted two batches).
        while server.engine.in_flight < 1:
            await asyncio.sleep(0.01)
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="x", max_retries=0)
        doomed = asyncio.create_task(
            client.audio.transcriptions.create(model="m", file=("a.wav", wav_bytes(tone(1.0, seed=2))))
        )
        while server.engine.in_flight < 2:  # the HTTP request's piece waits behind the first
            await asyncio.sleep(0.01)
        doomed.cancel()  # the SDK closes the connection
        # The server sees the disconnect and withdraws the piece while the first batch still runs.
        async with asyncio.timeout(2.5):
            while server.engine.in_flight > 1:
                await asyncio.sleep(0.01)
        await first
        while server.engine.in_flight > 0:
            await asyncio.sleep(0.01)
        await client.close()
    # The abandoned request's audio never reached a batch.
    assert len(cores[0].batches) == 1


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
async def test_the_http_port_serves_the_grpc_ports_certificate(pki: Pki, mtls: bool) -> None:  # noqa: F811
    config = with_server(tls_config(pki, mtls=mtls, auth_token=TOKEN), http_port=0)
    trusting = ssl.create_default_context(cafile=pki.path("server-ca.pem"))
    async with running_server(config) as (server, _):
        port = server.http_port

        async def health(context: ssl.SSLContext | None) -> tuple[int, dict[str, Any]]:
            return await asyncio.to_thread(raw_request, port, "GET", "/health", tls=context)

        if mtls:
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                await health(trusting)  # no client certificate
            pki.client_cert.configure_cert(trusting)
        assert await health(trusting) == (200, {"status": "serving"})
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            await health(None)  # plain HTTP to a TLS port
        status, body = await asyncio.to_thread(
            raw_request, port, "POST", "/v1/audio/transcriptions", file=("a.wav", wav_bytes(tone(1.0, seed=3))),
            token=TOKEN, tls=trusting,
        )  # fmt: skip
        assert status == 200 and body["text"]
