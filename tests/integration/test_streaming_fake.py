"""StreamingRecognize over real gRPC with the fake engine and the real Silero VAD.

Speech is espeak-ng (tests/speech.py): sentences separated by silences, with their true spans.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random

import grpc
import numpy as np
import pytest

from asr_server.audio.formats import samples_to_ms
from asr_server.config import StreamingConfig
from asr_server.engine.fake import FakeEngine, fake_transcript
from asr_server.engine.types import DecodeOptions, DecodeRequest
from asr_server.results import Word
from asr_server.transcription import AlignmentResult
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import (
    LINEAR16_16K,
    Received,
    audio_requests,
    pcm16,
    pcm16_roundtrip,
    run_stream,
    stream_config,
)

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

SENTENCES = [
    "Hello there, how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Streaming recognition is fun.",
    "Yes.",
    "Please call Stella and ask her to bring these things with her from the store.",
]
STARTED = pb.SPEECH_EVENT_TYPE_SPEECH_STARTED
ENDED = pb.SPEECH_EVENT_TYPE_SPEECH_ENDED


def fake_text(samples_16k: np.ndarray) -> str:
    # What the unary path gives for these samples with the fake engine (decode_piece pads to 0.5 s).
    padded = np.pad(samples_16k, (0, max(0, 8000 - samples_16k.shape[0])))
    return fake_transcript(DecodeRequest("x", padded, DecodeOptions(None, "", 4096)))[0]


def check_order(received: Received) -> None:
    """Per channel: STARTED, then interims, ENDED, then the final; utterance indexes count up from 0."""
    expected_index: dict[int, int] = {}
    open_: dict[int, bool] = {}
    for _, response in received.responses:
        if response.HasField("speech_event"):
            event = response.speech_event
            if event.type == STARTED:
                assert not open_.get(event.channel_index), "STARTED while an utterance is open"
                open_[event.channel_index] = True
            elif event.type == ENDED:
                assert open_.get(event.channel_index), "ENDED without STARTED"
                open_[event.channel_index] = False
        else:
            result = response.result
            index = expected_index.get(result.channel_index, 0)
            assert result.utterance_index == index, (result.utterance_index, index)
            if result.is_final:
                expected_index[result.channel_index] = index + 1
            else:
                assert open_.get(result.channel_index), "an interim outside its utterance"


async def test_espeak_sentences_in_20ms_frames_give_one_final_per_sentence_at_the_true_boundaries() -> None:
    audio, spans = synthesize_sentences(SENTENCES, silence_s=1.0)
    data = pcm16(audio)
    async with running_server(fake_config()) as (_, channel):
        received = await run_stream(pb_grpc.AsrServiceStub(channel), stream_config(), data, piece_ms=20)
    finals = received.finals
    assert len(finals) == len(SENTENCES), [(f.start_ms, f.end_ms) for f in finals]
    decoded = pcm16_roundtrip(audio)
    for final, (start_s, end_s) in zip(finals, spans, strict=True):
        assert abs(final.start_ms - start_s * 1000) <= 100, (final.start_ms, start_s)
        assert abs(final.end_ms - end_s * 1000) <= 100, (final.end_ms, end_s)
        # The final is the unary result of exactly the audio it spans.
        assert final.text == fake_text(decoded[final.start_ms * 16 : final.end_ms * 16])
        assert final.stability == 1.0 and final.language == "English"
    assert len(received.events(STARTED)) == len(received.events(ENDED)) == len(SENTENCES)
    check_order(received)
    progress = [r.processed_audio_ms for _, r in received.responses]
    # The last response comes at least at the last endpoint (speech end + the 800 ms trailing silence); a
    # speculative final is out as soon as it fires, before the rest of the stream's silence is processed.
    assert progress == sorted(progress) and progress[-1] >= spans[-1][1] * 1000 + 800 - 100


async def test_half_close_flushes_the_open_utterance_and_ends_ok() -> None:
    audio, spans = synthesize_sentences(SENTENCES[:2], silence_s=1.0)
    cut = int((spans[1][0] + 0.8) * 16000)  # mid-way through the second sentence
    async with running_server(fake_config()) as (_, channel):
        received = await run_stream(pb_grpc.AsrServiceStub(channel), stream_config(), pcm16(audio[:cut]), piece_ms=100)
    finals = received.finals
    assert len(finals) == 2
    assert finals[1].end_ms == cut // 16  # the end of the audio (ms floored)
    assert finals[1].text == fake_text(pcm16_roundtrip(audio[:cut])[finals[1].start_ms * 16 :])


async def test_single_utterance_ends_the_call_after_the_first_final() -> None:
    audio, _ = synthesize_sentences(SENTENCES[:3], silence_s=1.0)
    async with running_server(fake_config()) as (_, channel):
        received = await run_stream(
            pb_grpc.AsrServiceStub(channel), stream_config(single=True, interim=True), pcm16(audio), piece_ms=20
        )
    assert len(received.finals) == 1
    kinds = [r.speech_event.type for _, r in received.responses if r.HasField("speech_event")]
    assert kinds == [STARTED, ENDED, pb.SPEECH_EVENT_TYPE_END_OF_SINGLE_UTTERANCE]
    assert received.responses[-1][1].result.is_final


async def test_200_concurrent_streams_each_get_exactly_one_final_per_utterance_in_order() -> None:
    rng = random.Random(5)
    streams = []
    for _ in range(200):
        chosen = rng.sample(SENTENCES[:4], k=rng.randint(1, 3))
        audio, spans = synthesize_sentences(chosen, silence_s=rng.choice([0.9, 1.0, 1.2]))
        streams.append((pcm16(audio), spans))
    config = fake_config(max_inference_batch_size=64, max_batch_wait_ms=5)
    async with running_server(config) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        results = await asyncio.gather(
            *(run_stream(stub, stream_config(interim=True, interval_ms=500), data, piece_ms=250) for data, _ in streams)
        )
    for received, (_, spans) in zip(results, streams, strict=True):
        finals = received.finals
        assert [f.utterance_index for f in finals] == list(range(len(spans)))
        for final, (start_s, end_s) in zip(finals, spans, strict=True):
            assert abs(final.start_ms - start_s * 1000) <= 100 and abs(final.end_ms - end_s * 1000) <= 100
        check_order(received)


async def test_interims_skip_to_the_newest_audio_instead_of_queueing_up() -> None:
    audio, _ = synthesize_sentences([SENTENCES[4]], silence_s=0.5)
    cores: list[FakeEngine] = []

    def factory() -> FakeEngine:
        cores.append(FakeEngine(max_batch_size=4, batch_delay_ms=150))
        return cores[-1]

    async with running_server(fake_config(max_inference_batch_size=4), core_factory=factory) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        # A first stream pays for the server's one-time set-up (seconds on a loaded CI core), during which the
        # measured stream's audio would pile up and be endpointed in one go, with no room for an interim.
        await run_stream(stub, stream_config(interim=True, interval_ms=200), pcm16(audio[:16000]), piece_ms=100)
        received = await run_stream(
            stub, stream_config(interim=True, interval_ms=200), pcm16(audio), piece_ms=20, realtime=8.0
        )
    interims = [r for _, r in received.interims]
    # ~4 s of speech at 8x real time: one interim every 200 ms of audio would be ~20 decodes of 150 ms each.
    assert 1 <= len(interims) <= 8, len(interims)
    ends = [r.end_ms for r in interims]
    assert ends == sorted(ends)
    assert len(received.finals) == 1
    # Never more than one interim of this stream in one batch (the final may share a batch with one).
    assert all(len(batch) <= 2 for batch in cores[0].batches)


async def test_separate_channels_are_endpointed_on_their_own() -> None:
    left, left_spans = synthesize_sentences([SENTENCES[0]], silence_s=1.0)
    right, right_spans = synthesize_sentences([SENTENCES[1]], silence_s=2.5)
    n = max(left.shape[0], right.shape[0])
    stereo = np.zeros((n, 2), dtype=np.float32)
    stereo[: left.shape[0], 0] = left
    stereo[: right.shape[0], 1] = right
    fmt = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000, channel_count=2)
    config = stream_config(fmt, channel_mode=pb.CHANNEL_MODE_SEPARATE)
    async with running_server(fake_config()) as (_, channel):
        received = await run_stream(pb_grpc.AsrServiceStub(channel), config, pcm16(stereo), bytes_per_ms=64)
    by_channel = {f.channel_index: f for f in received.finals}
    assert sorted(by_channel) == [0, 1] and len(received.finals) == 2
    for index, spans in ((0, left_spans), (1, right_spans)):
        assert abs(by_channel[index].start_ms - spans[0][0] * 1000) <= 100
        assert abs(by_channel[index].end_ms - spans[0][1] * 1000) <= 100
    check_order(received)


async def test_single_utterance_with_separate_channels_gives_each_channel_its_final() -> None:
    # The right channel is mid-sentence when the left one's utterance ends: it used to be dropped.
    left, left_spans = synthesize_sentences([SENTENCES[0]], silence_s=1.0)
    right, right_spans = synthesize_sentences([SENTENCES[1]], silence_s=2.5)
    assert right_spans[0][0] < left_spans[0][1] + 0.8 < right_spans[0][1]
    n = max(left.shape[0], right.shape[0]) + 16000
    stereo = np.zeros((n, 2), dtype=np.float32)
    stereo[: left.shape[0], 0] = left
    stereo[: right.shape[0], 1] = right
    fmt = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000, channel_count=2)
    config = stream_config(fmt, channel_mode=pb.CHANNEL_MODE_SEPARATE, single=True, interim=True)
    async with running_server(fake_config()) as (_, channel):
        received = await run_stream(pb_grpc.AsrServiceStub(channel), config, pcm16(stereo), bytes_per_ms=64)
    by_channel = {f.channel_index: f for f in received.finals}
    assert sorted(by_channel) == [0, 1] and len(received.finals) == 2
    # Each channel's whole utterance, not one cut where the other channel's ended.
    for index, spans in ((0, left_spans), (1, right_spans)):
        assert abs(by_channel[index].end_ms - spans[0][1] * 1000) <= 100
    (end_event,) = received.events(pb.SPEECH_EVENT_TYPE_END_OF_SINGLE_UTTERANCE)
    assert abs(end_event.offset_ms - right_spans[0][1] * 1000) <= 1000
    assert received.finals[-1] == received.responses[-1][1].result


async def test_an_interim_never_ends_past_the_processed_audio_of_its_message() -> None:
    # Paced in real time, so an interim is answered before the next piece: the audio it decoded used to include
    # the samples past the last whole VAD frame, which processed_audio_ms does not count yet.
    audio, _ = synthesize_sentences(SENTENCES[1:2], silence_s=0.5)
    async with running_server(fake_config(max_batch_wait_ms=0)) as (_, channel):
        received = await run_stream(
            pb_grpc.AsrServiceStub(channel), stream_config(interim=True, interval_ms=300), pcm16(audio), piece_ms=90,
            realtime=1.0,
        )
    interims = [r for _, r in received.responses if r.HasField("result") and not r.result.is_final]
    assert len(interims) >= 3
    assert all(r.result.end_ms <= r.processed_audio_ms for r in interims), [
        (r.result.end_ms, r.processed_audio_ms) for r in interims
    ]


async def test_transcribe_stream_with_endpointing_returns_a_segment_per_utterance() -> None:
    audio, spans = synthesize_sentences(SENTENCES[:3], silence_s=1.0)
    data = pcm16(audio)
    recognition = pb.RecognitionConfig(audio_format=LINEAR16_16K, endpointing=pb.EndpointingConfig())

    async def upload():  # type: ignore[no-untyped-def]
        yield pb.TranscribeStreamRequest(config=recognition)
        for i in range(0, len(data), 10_000):
            yield pb.TranscribeStreamRequest(audio=data[i : i + 10_000])

    async with running_server(fake_config()) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        streamed = await stub.TranscribeStream(upload())
        unary = await stub.Transcribe(pb.TranscribeRequest(config=recognition, audio=data))
        live = await run_stream(stub, stream_config(), data, piece_ms=100)
    for response in (streamed, unary):
        segments = response.transcripts[0].segments
        assert len(segments) == 3
        for segment, (start_s, end_s) in zip(segments, spans, strict=True):
            assert abs(segment.start_ms - start_s * 1000) <= 100 and abs(segment.end_ms - end_s * 1000) <= 100
        # Same cuts and texts as a live stream of the same audio.
        assert [(s.start_ms, s.end_ms, s.text) for s in segments] == [
            (f.start_ms, f.end_ms, f.text) for f in live.finals
        ]


async def test_server_info_announces_streaming_and_endpointing() -> None:
    async with running_server(fake_config()) as (_, channel):
        info = await pb_grpc.AsrServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest())
    assert info.features.streaming_recognize and info.features.endpointing


# ---- bad input ----


async def call_status(
    stub: pb_grpc.AsrServiceStub, messages: list[pb.StreamingRecognizeRequest], *, hang: bool = False
) -> tuple[grpc.StatusCode, str, Received]:
    received = Received()

    async def requests():  # type: ignore[no-untyped-def]
        for message in messages:
            yield message
        if hang:
            await asyncio.sleep(30)

    call = stub.StreamingRecognize(requests())
    try:
        async for response in call:
            received.responses.append((0.0, response))
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or "", received
    return grpc.StatusCode.OK, "", received


AUDIO = pb.StreamingRecognizeRequest(audio=b"\0\0" * 1600)


@pytest.mark.parametrize(
    ("name", "messages", "code", "needle"),
    [
        ("audio before config", [AUDIO], grpc.StatusCode.INVALID_ARGUMENT, "first StreamingRecognizeRequest"),
        ("empty stream", [], grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        ("second config", [stream_config(), AUDIO, stream_config()], grpc.StatusCode.INVALID_ARGUMENT, "only once"),
        (
            "format change",
            [stream_config(), AUDIO, stream_config(pb.AudioFormat(encoding=pb.AUDIO_ENCODING_MULAW,
                                                                  sample_rate_hz=8000, channel_count=1))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "cannot change mid-stream",
        ),
        ("encoded file", [stream_config(pb.AudioFormat())], grpc.StatusCode.INVALID_ARGUMENT, "raw encoding"),
        (
            "endpointing out of range",
            [stream_config(endpointing=pb.EndpointingConfig(trailing_silence_ms=50))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "100 to 10000",
        ),
        ("interval out of range", [stream_config(interval_ms=50)], grpc.StatusCode.INVALID_ARGUMENT, "200 to 10000"),
        ("partial sample", [stream_config(), pb.StreamingRecognizeRequest(audio=b"\0\0\0")], grpc.StatusCode.OK, ""),
    ],
)
async def test_bad_input_gets_a_precise_status(
    name: str, messages: list[pb.StreamingRecognizeRequest], code: grpc.StatusCode, needle: str
) -> None:
    async with running_server(fake_config()) as (_, channel):
        got, details, _ = await call_status(pb_grpc.AsrServiceStub(channel), messages)
    assert got == code, (name, details)
    assert needle in details, (name, details)


async def test_an_idle_stream_flushes_its_utterance_then_ends_out_of_range_naming_the_flag() -> None:
    audio, _ = synthesize_sentences([SENTENCES[0]], silence_s=0.3)
    speech = pcm16(audio[: int(audio.shape[0] * 0.8)])  # the stream goes quiet mid-sentence
    config = dataclasses.replace(fake_config(), streaming=StreamingConfig(idle_timeout_s=0.5))
    messages = [stream_config()] + [
        pb.StreamingRecognizeRequest(audio=speech[i : i + 3200]) for i in range(0, len(speech), 3200)
    ]
    async with running_server(config) as (_, channel):
        loop = asyncio.get_running_loop()
        started = loop.time()
        code, details, received = await call_status(pb_grpc.AsrServiceStub(channel), messages, hang=True)
        elapsed = loop.time() - started
    # Not DEADLINE_EXCEEDED: the contract keeps that for the caller's own deadline.
    assert code == grpc.StatusCode.OUT_OF_RANGE, details
    assert "--stream-idle-timeout-s=0.5" in details
    assert len(received.finals) == 1  # the open utterance was not lost
    assert elapsed < 5


async def test_a_stream_that_never_sends_its_config_ends_out_of_range_too() -> None:
    config = dataclasses.replace(fake_config(), streaming=StreamingConfig(idle_timeout_s=0.3))
    async with running_server(config) as (_, channel):
        code, details, received = await call_status(pb_grpc.AsrServiceStub(channel), [], hang=True)
    assert code == grpc.StatusCode.OUT_OF_RANGE, details
    assert "--stream-idle-timeout-s=0.3" in details
    assert not received.responses


async def test_client_cancellation_frees_queued_decodes_at_once() -> None:
    cores: list[FakeEngine] = []

    def factory() -> FakeEngine:
        cores.append(FakeEngine(max_batch_size=1, batch_delay_ms=400))
        return cores[-1]

    audio, _ = synthesize_sentences(SENTENCES[:3], silence_s=0.8)
    async with running_server(fake_config(max_inference_batch_size=1, max_batch_wait_ms=0), core_factory=factory) as (
        server,
        channel,
    ):
        stub = pb_grpc.AsrServiceStub(channel)
        call = stub.StreamingRecognize(
            audio_requests(pcm16(audio), bytes_per_ms=32, piece_ms=100, head=[stream_config(interim=True)])
        )
        async for response in call:
            if response.HasField("speech_event") and response.speech_event.type == ENDED:
                break  # a final and maybe interims are queued behind the slow engine
        assert server.engine.in_flight > 0
        call.cancel()
        for _ in range(50):
            if server.engine.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert server.engine.in_flight == 0


class EvenAligner:
    """An aligner double: the text's words spread evenly over the audio it is given (times from its start)."""

    async def align(self, audio_16k: np.ndarray, text: str, language: str) -> AlignmentResult:
        words = text.split()
        step = samples_to_ms(audio_16k.shape[0]) // max(1, len(words))
        return AlignmentResult(tuple(Word(w, i * step, (i + 1) * step) for i, w in enumerate(words)), 1.0)


async def test_finals_carry_words_with_times_from_the_stream_start() -> None:
    audio, _ = synthesize_sentences(SENTENCES[:2], silence_s=1.0)
    async with running_server(fake_config(), aligner=EvenAligner()) as (_, channel):
        received = await run_stream(
            pb_grpc.AsrServiceStub(channel), stream_config(interim=True, return_word_timestamps=True), pcm16(audio)
        )
    assert len(received.finals) == 2
    for final in received.finals:
        assert final.word_timestamps_status == pb.WORD_TIMESTAMPS_STATUS_OK
        assert [w.text for w in final.words] == final.text.split()
        assert final.words[0].start_ms == final.start_ms
        assert final.start_ms <= final.words[-1].end_ms <= final.end_ms
    assert all(not r.words for _, r in received.interims)


async def test_word_timestamps_without_an_aligner_are_refused() -> None:
    async with running_server(fake_config()) as (_, channel):
        code, details, _ = await call_status(
            pb_grpc.AsrServiceStub(channel), [stream_config(return_word_timestamps=True)]
        )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "--aligner-model" in details


async def test_a_too_long_utterance_is_cut_below_the_maximum_at_quiet_points() -> None:
    # Two long sentences 0.25 s apart (less than the trailing silence): one utterance of ~8 s for the VAD.
    audio, spans = synthesize_sentences([SENTENCES[4], SENTENCES[1]], silence_s=0.25)
    config = stream_config(endpointing=pb.EndpointingConfig(max_utterance_ms=5000))
    async with running_server(fake_config()) as (_, channel):
        received = await run_stream(pb_grpc.AsrServiceStub(channel), config, pcm16(audio), piece_ms=100)
    finals = received.finals
    assert len(finals) >= 2
    assert all(f.end_ms - f.start_ms <= 5000 for f in finals)
    for a, b in zip(finals, finals[1:], strict=False):
        if b.start_ms - a.end_ms < 300:  # cut by the maximum: the next utterance goes on from the cut
            assert b.start_ms == a.end_ms
    # The first cut is in the quiet gap between the sentences (it lies in the utterance's second half).
    gap_start_ms, gap_end_ms = spans[0][1] * 1000, spans[1][0] * 1000
    assert gap_start_ms - 100 <= finals[0].end_ms <= gap_end_ms + 100, (finals[0].end_ms, gap_start_ms, gap_end_ms)
    check_order(received)
