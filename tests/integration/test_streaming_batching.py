"""Cross-stream batching: every stream's decodes and every unary call's chunks go through the one shared engine,
and batch with each other (real gRPC, real Silero VAD, the fake engine with a per-batch delay so work piles up).

Attribution: request ids are fresh uuid4s (`Transcriber.decode_piece`) for unary chunks and stream decodes alike,
so they do not tell who sent a request. Each caller instead sets its own `RecognitionConfig.context`, which reaches
the engine unchanged as `DecodeRequest.options.context`; the fake engine's `on_step` hook records, per batch, the
context of every request in it. The fake engine ignores the context, so tagging does not change how work batches.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from asr_server.engine.fake import FakeEngine, fake_transcript
from asr_server.engine.types import DecodeOptions, DecodePriority, DecodeRequest, WorkItem
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, wav_bytes
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import pcm16, run_stream, stream_config

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

SENTENCES = ["Hello there, how are you today?", "The quick brown fox jumps over the lazy dog."]
STREAMS = 3
UNARY_INTERVAL_S = 0.025


def unary_text(samples: np.ndarray) -> str:
    # The fake engine's words for what the server decodes from wav_bytes(samples) (one chunk).
    decoded = (np.clip(np.round(samples * 32767), -32768, 32767).astype(np.int16) / 32768.0).astype(np.float32)
    return fake_transcript(DecodeRequest("x", decoded, DecodeOptions(None, "", 4096)))[0]


async def test_stream_decodes_batch_with_other_streams_and_with_unary_calls() -> None:
    batches: list[list[str]] = []  # per engine batch, the context tag of each request in it

    def on_step(requests: list[DecodeRequest]) -> None:
        batches.append([r.options.context for r in requests])

    def factory() -> FakeEngine:
        return FakeEngine(max_batch_size=16, batch_delay_ms=60, on_step=on_step)

    audio, spans = synthesize_sentences(SENTENCES, silence_s=1.0)
    data = pcm16(audio)
    async with running_server(fake_config(max_inference_batch_size=16), core_factory=factory) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        streams_done = asyncio.Event()

        async def unary_call(tag: str, samples: np.ndarray) -> tuple[str, np.ndarray, pb.TranscribeResponse]:
            response = await stub.Transcribe(
                pb.TranscribeRequest(config=pb.RecognitionConfig(context=tag), audio=wav_bytes(samples))
            )
            return tag, samples, response

        async def unary_traffic() -> list[tuple[str, np.ndarray, pb.TranscribeResponse]]:
            # Open loop: a new call every UNARY_INTERVAL_S whatever the answers, so unary chunks are waiting whenever
            # a stream's decode arrives. Closed loops (send, await, send) fall into lockstep with the streams, each
            # group arriving while the other's batch runs, and then the two never share a batch.
            calls = []
            call = 0
            while not streams_done.is_set():
                tag = f"unary-{call}"
                calls.append(asyncio.create_task(unary_call(tag, tone(1.0, seed=call))))
                call += 1
                await asyncio.sleep(UNARY_INTERVAL_S)
            return list(await asyncio.gather(*calls))

        unary_task = asyncio.create_task(unary_traffic())
        try:
            received = await asyncio.gather(
                *(
                    run_stream(
                        stub,
                        stream_config(interim=True, interval_ms=200, context=f"stream-{i}"),
                        data,
                        piece_ms=20,
                        realtime=4.0,
                    )
                    for i in range(STREAMS)
                )
            )
        finally:
            streams_done.set()
        unary_calls = await unary_task

    # Every caller got its own answers.
    for stream in received:
        assert len(stream.finals) == len(SENTENCES)
        assert stream.interims
    for _, samples, response in unary_calls:
        assert response.transcripts[0].text == unary_text(samples)

    # Every request in every batch is attributed to exactly one known caller.
    stream_tags = {f"stream-{i}" for i in range(STREAMS)}
    unary_tags = {tag for tag, _, _ in unary_calls}
    seen = [tag for batch in batches for tag in batch]
    assert set(seen) <= stream_tags | unary_tags, set(seen) - stream_tags - unary_tags
    assert sorted(t for t in seen if t in unary_tags) == sorted(unary_tags)  # one chunk per unary call
    for i, stream in enumerate(received):
        # Each final and each interim the client saw was one decode (interims of a closed utterance are dropped).
        assert seen.count(f"stream-{i}") >= len(stream.finals) + len(stream.interims)

    streams_per_batch = [len(set(batch) & stream_tags) for batch in batches]
    assert max(streams_per_batch) >= 2, batches
    mixed = [batch for batch in batches if set(batch) & stream_tags and set(batch) & unary_tags]
    assert mixed, batches


class _AdmissionLog(FakeEngine):
    """The fake engine, recording for each request its priority and how many batches had run when it arrived."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.arrivals: dict[str, tuple[DecodePriority, int]] = {}

    def add(self, item: WorkItem) -> None:
        self.arrivals[item.request.request_id] = (item.request.priority, len(self.batches))
        super().add(item)


async def test_under_load_a_final_waits_only_behind_finals_never_behind_interims() -> None:
    # 24 streams asking for an interim every 200 ms of audio at twice real time: ~240 decodes a second against an
    # engine that runs 4 per 40 ms batch (~100 a second), so interims queue (one per stream at most).
    cores: list[_AdmissionLog] = []

    def factory() -> _AdmissionLog:
        cores.append(_AdmissionLog(max_batch_size=4, batch_delay_ms=40))
        return cores[-1]

    audio, spans = synthesize_sentences(SENTENCES, silence_s=1.0)
    streams = 24
    async with running_server(fake_config(max_inference_batch_size=4), core_factory=factory) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        received = await asyncio.gather(
            *(
                run_stream(stub, stream_config(interim=True, interval_ms=200), pcm16(audio[i * 800 :]), realtime=2.0)
                for i in range(streams)  # each starts 50 ms later into the audio: finals do not all come at once
            )
        )
    for stream in received:
        assert [f.utterance_index for f in stream.finals] == list(range(len(SENTENCES)))
    core = cores[0]
    ran_in = {rid: step for step, batch in enumerate(core.batches) for rid in batch}
    finals = [rid for rid, (priority, _) in core.arrivals.items() if priority is DecodePriority.FINAL]
    assert len(finals) == streams * len(SENTENCES)
    contended = 0
    for index, rid in enumerate(finals):
        arrived = core.arrivals[rid][1]
        # What was queued when this final arrived: came no later, ran no earlier (aborted interims left out).
        waiting = [o for o, (_, at) in core.arrivals.items() if o != rid and at <= arrived <= ran_in.get(o, -1)]
        finals_ahead = len(set(waiting) & set(finals[:index]))
        interims_ahead = sum(1 for o in waiting if core.arrivals[o][0] is DecodePriority.INTERIM)
        contended += interims_ahead >= 4
        # It runs once the batch in progress and the finals before it have run: interims never go first.
        assert ran_in[rid] - arrived <= 1 + finals_ahead // 4, (rid, ran_in[rid] - arrived, finals_ahead)
    # And no batch took an interim while a final that had arrived before it was left waiting.
    for step, batch in enumerate(core.batches):
        if any(core.arrivals[rid][0] is DecodePriority.INTERIM for rid in batch):
            assert not any(core.arrivals[f][1] <= step < ran_in[f] for f in finals), step
    # The load was real: finals arrived with a batch or more of interims queued ahead of them.
    assert contended >= streams // 2, contended
