"""Audio ingest end to end: every encoding and rate through gRPC to the tiny checkpoint, stereo calls per channel,
long recordings in chunks, and malformed input with its exact status while good requests go on."""

from __future__ import annotations

import asyncio
import io
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
import soundfile as sf
import soxr

from asr_server.audio.chunking import plan_chunks
from asr_server.audio.g711 import alaw_encode, mulaw_encode
from asr_server.engine.fake import fake_transcript
from asr_server.engine.generate_core import GenerateEngine
from asr_server.engine.types import DecodeOptions, DecodeRequest
from asr_server.models.loading import LoadedAsrModel, load_asr_model
from asr_server.models.tiny_checkpoint import TinyCheckpoints
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, wav_bytes, with_limits
from tests.speech import espeak_available, synthesize

MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def tiny_asr(tiny_checkpoints: TinyCheckpoints) -> LoadedAsrModel:
    return load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cpu")


def reference_text(loaded: LoadedAsrModel, audio_16k: np.ndarray) -> str:
    import torch

    inputs = loaded.processor.apply_transcription_request(audio=audio_16k.astype(np.float32))
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    return str(loaded.processor.decode(out[0, inputs["input_ids"].shape[1] :], return_format="parsed")["transcription"])


def signal(rate_hz: int, channels: int, seconds: float = 1.6) -> np.ndarray:
    """(frames, channels) float64: a tone and a chirp, different per channel."""
    t = np.arange(int(seconds * rate_hz)) / rate_hz
    columns = [0.4 * np.sin(2 * np.pi * (220 + 110 * c) * t) + 0.2 * np.sin(2 * np.pi * (200 + 900 * t) * t) for c in range(channels)]
    return np.stack(columns, axis=1)


def mulaw_reference(codes: np.ndarray) -> np.ndarray:
    """ITU-T G.711 mu-law expansion, written out independently of the server's table."""
    u = ~codes.astype(np.int32) & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude) / 32768.0


def alaw_reference(codes: np.ndarray) -> np.ndarray:
    """ITU-T G.711 A-law expansion (as in Sun's g711.c), written out independently of the server's table."""
    a = codes.astype(np.int32) ^ 0x55
    segment = (a >> 4) & 0x07
    t = (a & 0x0F) << 4
    magnitude = np.where(segment == 0, t + 8, (t + 0x108) << np.maximum(segment - 1, 0))
    return np.where(a & 0x80, magnitude, -magnitude) / 32768.0


def reference_16k(frames: np.ndarray, rate_hz: int) -> np.ndarray:
    mono = frames.mean(axis=1)
    if rate_hz == 16000:
        return mono.astype(np.float32)
    return soxr.resample(mono, rate_hz, 16000, quality="HQ").astype(np.float32)


def encode(frames: np.ndarray, encoding: str) -> tuple[bytes, np.ndarray]:
    """The bytes to send and the float64 frames they decode to."""
    if encoding == "LINEAR16":
        pcm = np.clip(np.round(frames * 32767), -32768, 32767).astype("<i2")
        return pcm.tobytes(), pcm / 32768.0
    if encoding == "FLOAT32":
        data = frames.astype("<f4")
        return data.tobytes(), data.astype(np.float64)
    pcm16 = np.clip(np.round(frames * 32767), -32768, 32767).astype(np.int16)
    if encoding == "ALAW":
        codes = alaw_encode(pcm16)
        return codes.tobytes(), alaw_reference(codes)
    codes = mulaw_encode(pcm16)
    return codes.tobytes(), mulaw_reference(codes)


CASES = [
    ("LINEAR16", 8000, 1), ("LINEAR16", 16000, 1), ("LINEAR16", 44100, 2), ("LINEAR16", 48000, 2),
    ("FLOAT32", 16000, 1), ("FLOAT32", 48000, 1), ("MULAW", 8000, 1), ("MULAW", 8000, 2),
    ("ALAW", 8000, 1), ("ALAW", 8000, 2),
]


async def test_each_encoding_and_rate_gives_the_reference_transcript(tiny_asr: LoadedAsrModel) -> None:
    requests, expected = [], []
    for encoding, rate_hz, channels in CASES:
        data, decoded = encode(signal(rate_hz, channels), encoding)
        fmt = pb.AudioFormat(encoding=pb.AudioEncoding.Value(f"AUDIO_ENCODING_{encoding}"), sample_rate_hz=rate_hz,
                             channel_count=channels)
        requests.append(pb.TranscribeRequest(config=pb.RecognitionConfig(audio_format=fmt, max_new_tokens=MAX_NEW_TOKENS), audio=data))
        expected.append(reference_text(tiny_asr, reference_16k(decoded, rate_hz)))
    # Encoded files: header read, same reference as the raw samples they hold.
    for rate_hz, fmt_name in ((22050, "WAV"), (44100, "FLAC")):
        frames = signal(rate_hz, 2)
        buffer = io.BytesIO()
        sf.write(buffer, frames, rate_hz, format=fmt_name, subtype="PCM_16")
        pcm = np.clip(np.round(frames * 32767), -32768, 32767) / 32768.0
        requests.append(pb.TranscribeRequest(config=pb.RecognitionConfig(max_new_tokens=MAX_NEW_TOKENS), audio=buffer.getvalue()))
        expected.append(reference_text(tiny_asr, reference_16k(pcm, rate_hz)))
    # Lossy files: the reference is the samples libsndfile decodes them to, converted as above.
    for rate_hz, channels, fmt_name, subtype in (
        (44100, 2, "OGG", "VORBIS"), (48000, 1, "OGG", "OPUS"), (44100, 2, "MP3", "MPEG_LAYER_III"),
    ):
        buffer = io.BytesIO()
        sf.write(buffer, signal(rate_hz, channels), rate_hz, format=fmt_name, subtype=subtype)
        decoded_frames, decoded_rate = sf.read(io.BytesIO(buffer.getvalue()), dtype="float64", always_2d=True)
        assert decoded_rate == rate_hz
        requests.append(pb.TranscribeRequest(config=pb.RecognitionConfig(max_new_tokens=MAX_NEW_TOKENS), audio=buffer.getvalue()))
        expected.append(reference_text(tiny_asr, reference_16k(decoded_frames, rate_hz)))
    async with running_server(fake_config(kind="transformers", max_inference_batch_size=16),
                              core_factory=lambda: GenerateEngine(tiny_asr, max_batch_size=16)) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        responses = await asyncio.gather(*(stub.Transcribe(r) for r in requests))
    got = [r.transcripts[0].text for r in responses]
    assert got == expected
    assert len(set(expected)) > 3  # different audio, different gibberish: the comparison has teeth


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is installed by scripts/system-deps.sh")
async def test_real_speech_as_a_file_and_as_each_telephony_encoding_gives_the_reference_transcript(
    tiny_asr: LoadedAsrModel,
) -> None:
    speech, rate_hz = synthesize("Your call is important to us. Please hold while we connect you.")
    frames = (0.9 * speech / np.abs(speech).max())[:, None].astype(np.float64)
    phone = soxr.resample(frames, rate_hz, 8000, quality="HQ")  # what a phone line carries
    cases: list[tuple[pb.TranscribeRequest, np.ndarray]] = []
    file = io.BytesIO()
    sf.write(file, frames, rate_hz, format="WAV", subtype="PCM_16")
    pcm = np.clip(np.round(frames * 32767), -32768, 32767) / 32768.0
    cases.append((pb.TranscribeRequest(config=pb.RecognitionConfig(max_new_tokens=MAX_NEW_TOKENS), audio=file.getvalue()),
                  reference_16k(pcm, rate_hz)))
    for encoding in ("LINEAR16", "MULAW", "ALAW"):
        data, decoded = encode(phone, encoding)
        fmt = pb.AudioFormat(encoding=pb.AudioEncoding.Value(f"AUDIO_ENCODING_{encoding}"), sample_rate_hz=8000, channel_count=1)
        cases.append((pb.TranscribeRequest(config=pb.RecognitionConfig(audio_format=fmt, max_new_tokens=MAX_NEW_TOKENS), audio=data),
                      reference_16k(decoded, 8000)))
    expected = [reference_text(tiny_asr, audio) for _, audio in cases]
    async with running_server(fake_config(kind="transformers"), core_factory=lambda: GenerateEngine(tiny_asr, max_batch_size=4)) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        responses = await asyncio.gather(*(stub.Transcribe(request) for request, _ in cases))
    assert [r.transcripts[0].text for r in responses] == expected
    assert all(r.audio_duration_ms == pytest.approx(1000 * len(speech) / rate_hz, abs=2) for r in responses)


async def test_stereo_8k_mulaw_call_in_20ms_frames_gives_one_result_per_channel(tiny_asr: LoadedAsrModel) -> None:
    frames = signal(8000, 2, seconds=2.0)
    frames[:, 1] *= 0.3  # the customer is quieter than the agent
    data, decoded = encode(frames, "MULAW")
    frame_bytes = 160 * 2  # 20 ms at 8 kHz: 160 bytes per channel, interleaved
    fmt = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_MULAW, sample_rate_hz=8000, channel_count=2)
    config = pb.RecognitionConfig(audio_format=fmt, channel_mode=pb.CHANNEL_MODE_SEPARATE, max_new_tokens=MAX_NEW_TOKENS)

    async def messages() -> AsyncIterator[pb.TranscribeStreamRequest]:
        yield pb.TranscribeStreamRequest(config=config)
        for start in range(0, len(data), frame_bytes):
            yield pb.TranscribeStreamRequest(audio=data[start : start + frame_bytes])

    async with running_server(fake_config(kind="transformers"),
                              core_factory=lambda: GenerateEngine(tiny_asr, max_batch_size=4)) as (_, channel):
        response = await pb_grpc.AsrServiceStub(channel).TranscribeStream(messages())
    assert [t.channel_index for t in response.transcripts] == [0, 1]
    for channel_index, transcript in enumerate(response.transcripts):
        want = reference_text(tiny_asr, soxr.resample(decoded[:, channel_index], 8000, 16000, quality="HQ").astype(np.float32))
        assert transcript.text == want
    assert response.transcripts[0].text != response.transcripts[1].text
    assert response.audio_duration_ms == 2000


def burst_recording(seconds: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Loud bursts (0.5-3 s) separated by silences (0.6-1.2 s); returns 16 kHz samples and the bursts' spans."""
    rng = np.random.default_rng(1)
    total = seconds * 16000
    samples = np.zeros(total, dtype=np.float32)
    bursts, position = [], 8000
    while position < total:
        length = min(int(rng.uniform(0.5, 3.0) * 16000), total - position)
        samples[position : position + length] = rng.uniform(0.05, 0.5) * np.sin(np.arange(length) * 0.07)
        bursts.append((position, position + length))
        position += length + int(rng.uniform(0.6, 1.2) * 16000)
    return samples, bursts


async def test_a_25_minute_recording_is_cut_in_silences_with_right_offsets_and_merged_text() -> None:
    samples, bursts = burst_recording(25 * 60)
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    data = pcm.tobytes()
    decoded = (pcm / 32768.0).astype(np.float32)
    fmt = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000, channel_count=1)

    async def messages() -> AsyncIterator[pb.TranscribeStreamRequest]:
        yield pb.TranscribeStreamRequest(config=pb.RecognitionConfig(audio_format=fmt))
        for start in range(0, len(data), 1 << 20):
            yield pb.TranscribeStreamRequest(audio=data[start : start + (1 << 20)])

    # 25 min with the server's 1200 s and a 300 s chunk limit: 2 and at least 5 chunks.
    for max_chunk_s, min_chunks in ((1200, 2), (300, 5)):
        async with running_server(with_limits(fake_config(), max_chunk_s=max_chunk_s)) as (_, channel):
            response = await pb_grpc.AsrServiceStub(channel).TranscribeStream(messages())
        (transcript,) = response.transcripts
        segments = list(transcript.segments)
        assert len(segments) >= min_chunks
        assert segments[0].start_ms == 0 and segments[-1].end_ms == 25 * 60 * 1000
        for previous, following in zip(segments, segments[1:], strict=False):
            assert previous.end_ms == following.start_ms
            cut = previous.end_ms * 16
            assert not any(start <= cut < end for start, end in bursts), f"cut at {cut / 16000:.2f} s is inside speech"
        # The pieces the engine saw are the planner's spans (cut positions in samples; ms rounded down, as durations):
        # each segment's offsets and text must be those of its own span.
        spans = plan_chunks(decoded, max_chunk_s=max_chunk_s)
        assert len(spans) == len(segments)
        for segment, span in zip(segments, spans, strict=True):
            assert segment.end_ms - segment.start_ms <= max_chunk_s * 1000
            assert (segment.start_ms, segment.end_ms) == (span.start_sample // 16, span.end_sample // 16)
            piece = decoded[span.start_sample : span.end_sample]
            assert segment.text == fake_transcript(DecodeRequest("x", piece, DecodeOptions(None, "", 4096)))[0]
        assert transcript.text == " ".join(s.text for s in segments)
        assert transcript.language == "English"


def wav_with_data_size(data: bytes, size: int) -> bytes:
    offset = data.index(b"data") + 4
    return data[:offset] + struct.pack("<I", size) + data[offset + 4 :]


GOOD_WAV = wav_bytes(np.sin(np.arange(24000) * 0.05).astype(np.float32) * 0.3)


def raw(encoding: int, rate_hz: int, channels: int, audio: bytes) -> pb.TranscribeRequest:
    fmt = pb.AudioFormat(encoding=encoding, sample_rate_hz=rate_hz, channel_count=channels)  # type: ignore[arg-type]
    return pb.TranscribeRequest(config=pb.RecognitionConfig(audio_format=fmt), audio=audio)


MALFORMED: list[tuple[str, pb.TranscribeRequest, grpc.StatusCode, str]] = [
    ("truncated wav", pb.TranscribeRequest(audio=GOOD_WAV[: len(GOOD_WAV) // 2]), grpc.StatusCode.INVALID_ARGUMENT, "trunc"),
    ("lying header", pb.TranscribeRequest(audio=wav_with_data_size(GOOD_WAV, 10 * len(GOOD_WAV))),
     grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
    ("odd LINEAR16", raw(pb.AUDIO_ENCODING_LINEAR16, 16000, 1, b"\x01\x02\x03"), grpc.StatusCode.INVALID_ARGUMENT, "whole number of frames"),
    ("rate 0", raw(pb.AUDIO_ENCODING_LINEAR16, 0, 1, b"\0\0" * 800), grpc.StatusCode.INVALID_ARGUMENT, "8000 to 48000"),
    ("rate 1e6", raw(pb.AUDIO_ENCODING_LINEAR16, 1_000_000, 1, b"\0\0" * 800), grpc.StatusCode.INVALID_ARGUMENT, "8000 to 48000"),
    ("zero channels", raw(pb.AUDIO_ENCODING_MULAW, 8000, 0, b"\xff" * 800), grpc.StatusCode.INVALID_ARGUMENT, "1 to 8"),
    ("NaN", raw(pb.AUDIO_ENCODING_FLOAT32, 16000, 1, np.array([0.1, np.nan] * 400, "<f4").tobytes()),
     grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    ("Inf", raw(pb.AUDIO_ENCODING_FLOAT32, 16000, 1, np.array([0.1, np.inf] * 400, "<f4").tobytes()),
     grpc.StatusCode.INVALID_ARGUMENT, "Inf"),
    ("1e30 samples", raw(pb.AUDIO_ENCODING_FLOAT32, 16000, 1, np.full(16000, 1e30, "<f4").tobytes()),
     grpc.StatusCode.INVALID_ARGUMENT, "within +-1000"),
    ("unknown encoding", raw(42, 16000, 1, b"\0\0" * 800), grpc.StatusCode.INVALID_ARGUMENT, "AUDIO_ENCODING_MULAW"),
    ("unreadable file", pb.TranscribeRequest(audio=b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8),
     grpc.StatusCode.INVALID_ARGUMENT, "WAV"),
    ("too long", raw(pb.AUDIO_ENCODING_MULAW, 8000, 1, b"\xff" * 8000 * 61), grpc.StatusCode.RESOURCE_EXHAUSTED, "60"),
]


@pytest.mark.parametrize(("name", "request_", "code", "needle"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_audio_gets_its_exact_status_and_disturbs_no_one(
    name: str, request_: pb.TranscribeRequest, code: grpc.StatusCode, needle: str
) -> None:
    config = with_limits(fake_config(max_batch_wait_ms=30.0), max_audio_duration_s=60)
    good = pb.TranscribeRequest(audio=GOOD_WAV)
    async with running_server(config) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        outcomes: list[Any] = await asyncio.gather(
            stub.Transcribe(good), stub.Transcribe(request_), stub.Transcribe(good), return_exceptions=True
        )
    error = outcomes[1]
    assert isinstance(error, grpc.aio.AioRpcError), (name, error)
    assert error.code() == code, (name, error.details())
    assert needle.lower() in (error.details() or "").lower(), (name, error.details())
    assert isinstance(outcomes[0], pb.TranscribeResponse) and isinstance(outcomes[2], pb.TranscribeResponse)
    assert outcomes[0].transcripts[0].text and outcomes[0].transcripts[0].text == outcomes[2].transcripts[0].text
