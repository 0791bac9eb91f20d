"""The engine's own series on /metrics (batch size, generated tokens, KV pages, aligner load), read at scrape time:
from the core in-process, and from the stats an engine process pushes (--engine-process on), never by a round trip
on the scrape thread."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from asr_server.config import Config, ContinuousConfig, EngineConfig, ModelConfig
from asr_server.engine.core import BATCH_SIZE_BUCKETS, StepCounter
from asr_server.metrics import AlignerLoad, ReplicaLoad, ServerMetrics
from asr_server.models.tiny_checkpoint import TinyCheckpoints
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, wav_bytes

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: ServerMetrics) -> Samples:
    samples = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    matching = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    return sum(matching) if matching else None


async def scrape_when(metrics: ServerMetrics, ready: Any, timeout_s: float = 10.0) -> Samples:
    """Scrapes (on a thread, as prometheus_client's server does) until `ready(samples)`: an engine process pushes its
    stats about once a second."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = await asyncio.to_thread(scrape, metrics)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("process", ["off", "on"])
async def test_batch_sizes_and_generated_tokens_are_scraped_in_process_and_from_an_engine_process(
    process: str,
) -> None:
    config = fake_config(max_inference_batch_size=4, fake_batch_delay_ms=50)
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, process=process))
    requests = [pb.TranscribeRequest(audio=wav_bytes(tone(0.5 + i * 0.3, seed=i))) for i in range(6)]
    async with running_server(config) as (server, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        responses = await asyncio.gather(*(stub.Transcribe(r) for r in requests))
        assert all(r.transcripts[0].text for r in responses)
        samples = await scrape_when(
            server.metrics,
            lambda s: value(s, "asr_engine_batch_size_sum") == 6 and value(s, "asr_engine_running_requests") == 0,
        )
        load = server.live_load()
    # The queues are read from the core in-process, and from the stats an engine process pushes: both empty now.
    assert value(samples, "asr_engine_waiting_requests", replica="0") == 0
    assert value(samples, "asr_engine_running_requests", replica="0") == 0
    assert (load.live_streams, load.engine_waiting_requests) == (0, 0)
    # Every request was in exactly one batch of at most 4 rows.
    assert value(samples, "asr_engine_batch_size_sum", replica="0") == 6
    batches = value(samples, "asr_engine_batch_size_count", replica="0")
    assert batches is not None and 2 <= batches <= 6
    assert value(samples, "asr_engine_batch_size_bucket", replica="0", le="4.0") == batches
    assert value(samples, "asr_engine_batch_size_bucket", replica="0", le="+Inf") == batches
    tokens = value(samples, "asr_engine_generated_tokens_total", replica="0")
    assert tokens is not None and tokens >= 6
    # The fake core has no paged KV cache: no KV series rather than made-up zeros.
    assert value(samples, "asr_engine_kv_pages_total") is None


def _continuous_config(model: str, process: str) -> Config:
    engine = EngineConfig(
        kind="continuous",
        max_batch_wait_ms=0.0,
        continuous=ContinuousConfig(max_running=4, kv_cache_tokens=8192),
        warmup=False,
        process=process,
    )
    return dataclasses.replace(
        fake_config(), model=ModelConfig(model=model, device="cpu", dtype="float32"), engine=engine
    )


@pytest.mark.slow
@pytest.mark.parametrize("process", ["off", "on"])
async def test_the_continuous_engine_reports_its_kv_pages_steps_and_tokens(
    tiny_checkpoints: TinyCheckpoints, process: str
) -> None:
    config = _continuous_config(str(tiny_checkpoints.asr_hf), process)
    rng = np.random.default_rng(0)
    audio = [(0.1 * rng.standard_normal(16000 * (1 + i))).astype(np.float32) for i in range(3)]
    fmt = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_FLOAT32, sample_rate_hz=16000, channel_count=1)
    async with running_server(config) as (server, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        before = await scrape_when(server.metrics, lambda s: value(s, "asr_engine_kv_pages_total") is not None)
        calls = [
            stub.Transcribe(
                pb.TranscribeRequest(audio=a.tobytes(), config=pb.RecognitionConfig(audio_format=fmt, max_new_tokens=8))
            )
            for a in audio
        ]
        await asyncio.gather(*calls)
        after = await scrape_when(
            server.metrics,
            lambda s: (value(s, "asr_engine_generated_tokens_total") or 0) > 0
            and value(s, "asr_engine_kv_pages_used") == 0,
        )
    total = value(before, "asr_engine_kv_pages_total", replica="0")
    assert total is not None and total >= 8192 // 64 - 1  # 64-token pages, but the scratch one
    assert value(before, "asr_engine_kv_pages_used", replica="0") == 0
    assert value(after, "asr_engine_kv_pages_total", replica="0") == total
    assert value(after, "asr_engine_kv_pages_used", replica="0") == 0  # all given back once the calls ended
    steps = value(after, "asr_engine_batch_size_count", replica="0")
    rows = value(after, "asr_engine_batch_size_sum", replica="0")
    tokens = value(after, "asr_engine_generated_tokens_total", replica="0")
    assert steps is not None and rows is not None and tokens is not None
    # Each request decodes at most 8 tokens: one from its prefill, the others one per decode step and row.
    assert 1 <= steps and rows <= 3 * 8
    assert tokens == rows + 3
    assert rows / steps <= 3


def test_step_counter_buckets_batch_sizes_for_the_histogram() -> None:
    counter = StepCounter()
    for rows in (1, 3, 4, 600):
        counter.step(rows, generated_tokens=rows)
    counter.tokens(2)
    stats = counter.snapshot(kv_pages_used=5, kv_pages_total=10)
    assert stats.steps == 4 and stats.rows == 608 and stats.generated_tokens == 610
    assert len(stats.batch_size_counts) == len(BATCH_SIZE_BUCKETS) + 1
    assert stats.batch_size_counts[0] == 1  # le 1
    assert stats.batch_size_counts[2] == 2  # le 4: 3 and 4
    assert stats.batch_size_counts[-1] == 1  # over 512
    metrics = ServerMetrics(
        engine_load=lambda: [ReplicaLoad("0", 0, 0, 0, stats)], aligner_load=lambda: AlignerLoad(3, 2)
    )
    samples = scrape(metrics)
    assert value(samples, "asr_engine_batch_size_bucket", le="2.0") == 1
    assert value(samples, "asr_engine_batch_size_bucket", le="4.0") == 3
    assert value(samples, "asr_engine_batch_size_bucket", le="512.0") == 3
    assert value(samples, "asr_engine_batch_size_bucket", le="+Inf") == 4
    assert value(samples, "asr_engine_kv_pages_used", replica="0") == 5
    assert value(samples, "asr_aligner_in_flight_requests") == 3
    assert value(samples, "asr_aligner_restarts_total") == 2
    # No aligner configured: no aligner series.
    assert value(scrape(ServerMetrics()), "asr_aligner_restarts_total") is None
