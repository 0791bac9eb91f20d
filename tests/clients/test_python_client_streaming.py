"""The Python client's live streaming (`AsrClient.stream`, `AsyncAsrClient.stream`, `asr-client stream`) against
the real server: fake engine, real Silero VAD, espeak-ng sentences with 1 s pauses (tests/speech.py).

Every final is the unary result of exactly the audio it spans, so its text is `fake_text` of that span of what the
server decoded (the WAV's 16-bit samples), as in tests/integration/test_streaming_fake.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from asr_client import AsrClient, AsyncAsrClient, InvalidArgumentError, StreamingResult
from asr_client.cli import main as cli_main
from asr_server.engine.fake import fake_transcript
from asr_server.engine.types import DecodeOptions, DecodeRequest
from qwenasr.v1 import asr_pb2 as pb
from tests.clients.servers import threaded_server
from tests.helpers import fake_config, wav_bytes
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import pcm16_roundtrip

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

RATE = 16_000
SENTENCES = [
    "Hello there, how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Streaming recognition is fun.",
]
# The VAD's boundaries fall within about -35..+60 ms of the true speech edges (streaming/endpoint.py).
TOLERANCE_S = 0.15


def fake_text(samples_16k: np.ndarray) -> str:
    # What the unary path gives for these samples with the fake engine (decode_piece pads to 0.5 s).
    padded = np.pad(samples_16k, (0, max(0, 8000 - samples_16k.shape[0])))
    return fake_transcript(DecodeRequest("x", padded, DecodeOptions(None, "", 4096)))[0]


class Speech:
    """Sentences as a WAV file, with their true spans and the samples the server decodes."""

    def __init__(self, path: Path, sentences: Sequence[str], silence_s: float) -> None:
        self.audio, self.spans = synthesize_sentences(sentences, silence_s=silence_s)
        self.decoded = pcm16_roundtrip(self.audio)
        self.duration_s = self.audio.shape[0] / RATE
        self.path = path
        path.write_bytes(wav_bytes(self.audio))

    def expected_text(self, start_s: float, end_s: float) -> str:
        return fake_text(self.decoded[round(start_s * RATE) : round(end_s * RATE)])


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Speech:
    return Speech(tmp_path_factory.mktemp("speech") / "three.wav", SENTENCES, silence_s=1.0)


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory) -> Speech:
    """One sentence, ~2.7 s in all: short enough to stream in real time."""
    return Speech(tmp_path_factory.mktemp("speech") / "short.wav", SENTENCES[:1], silence_s=0.5)


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with threaded_server(fake_config()) as (_, address):
        yield address


@pytest.fixture()
def client(target: str) -> Iterator[AsrClient]:
    with AsrClient(target, timeout_s=30) as c:
        yield c


def check_results(results: Sequence[StreamingResult], speech: Speech, *, interims_per_utterance: bool) -> None:
    """One final per sentence, in order, at the true spans, with the fake engine's text of exactly that span;
    every interim comes before its own utterance's final and covers a prefix of it."""
    finals = [r for r in results if r.is_final]
    assert len(finals) == len(speech.spans), [(f.start_time, f.end_time) for f in finals]
    for index, (final, (start_s, end_s)) in enumerate(zip(finals, speech.spans, strict=True)):
        assert final.utterance_index == index and final.channel_index == 0
        assert abs(final.start_time - start_s) <= TOLERANCE_S, (index, final.start_time, start_s)
        assert abs(final.end_time - end_s) <= TOLERANCE_S, (index, final.end_time, end_s)
        assert final.text and final.text == speech.expected_text(final.start_time, final.end_time), index
        assert (final.language, final.stability, final.time_stamps) == ("English", 1.0, None)
    finals_seen = 0
    interims: dict[int, list[StreamingResult]] = {}
    for result in results:
        if result.is_final:
            finals_seen += 1
            continue
        # An interim belongs to the utterance still open: the one whose final comes next.
        assert result.utterance_index == finals_seen, (result.utterance_index, finals_seen)
        own_final = finals[result.utterance_index]
        assert result.start_time == own_final.start_time and result.end_time > result.start_time
        assert 0.0 <= result.stability < 1.0
        interims.setdefault(result.utterance_index, []).append(result)
    assert interims, "no interim results although interim_results=True"
    if interims_per_utterance:
        assert sorted(interims) == list(range(len(finals))), sorted(interims)
    progress = [r.processed_time for r in results]
    assert progress == sorted(progress)


def test_stream_of_a_wav_file_gives_interims_then_one_final_per_sentence(client: AsrClient, speech: Speech) -> None:
    started = time.monotonic()
    results = list(client.stream(speech.path, realtime=False, interim_interval_ms=200))
    assert time.monotonic() - started < speech.duration_s  # not paced: faster than real time
    # Unpaced, the whole file arrives faster than the interims are decoded; interims still come (the server
    # decodes one every 200 ms of audio when it can) but not necessarily for every sentence.
    check_results(results, speech, interims_per_utterance=False)


def test_stream_of_paced_frames_gives_interims_before_every_final(client: AsrClient, speech: Speech) -> None:
    def frames(speedup: float = 6.0, frame_ms: int = 20) -> Iterator[np.ndarray]:
        """Float frames (the client converts them to LINEAR16), at `speedup` times real time."""
        step = RATE * frame_ms // 1000
        begin = time.monotonic()
        for i, offset in enumerate(range(0, speech.audio.shape[0], step)):
            delay = begin + i * frame_ms / 1000 / speedup - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            yield speech.audio[offset : offset + step]

    fmt = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=RATE, channel_count=1)
    results = list(client.stream(frames(), audio_format=fmt, realtime=False, interim_interval_ms=500))
    check_results(results, speech, interims_per_utterance=True)
    # The same audio as the file: the same cuts and texts.
    from_file = [(r.start_time, r.end_time, r.text) for r in client.stream(speech.path, realtime=False,
                                                                          interim_results=False)]
    assert [(r.start_time, r.end_time, r.text) for r in results if r.is_final] == from_file


def test_stream_without_interims_gives_finals_only(client: AsrClient, speech: Speech) -> None:
    results = list(client.stream(speech.path, realtime=False, interim_results=False))
    assert [r.is_final for r in results] == [True] * len(SENTENCES)
    assert [r.utterance_index for r in results] == list(range(len(SENTENCES)))


async def test_async_stream_gives_the_same_results(target: str, speech: Speech) -> None:
    with AsrClient(target) as sync_client:
        expected = list(sync_client.stream(speech.path, realtime=False, interim_results=False))
    async with AsyncAsrClient(target) as client:
        results = [r async for r in client.stream(speech.path, realtime=False, interim_interval_ms=200)]
        # processed_time is how far the server had got when it answered: it depends on timing.
        assert [dataclasses.replace(r, processed_time=0) for r in results if r.is_final] == [
            dataclasses.replace(r, processed_time=0) for r in expected
        ]
        check_results(results, speech, interims_per_utterance=False)


# ---- the CLI ----

CLI_LINE_FORMAT = "[{start:7.2f}-{end:7.2f}]{mark}{text}"
CLI_LINE = re.compile(r"\[ *(\d+\.\d\d)- *(\d+\.\d\d)\]([ ~])(.*)")


def test_cli_stream_prints_one_line_per_final(target: str, short: Speech, capsys: pytest.CaptureFixture[str]) -> None:
    # Exact times and texts from --format json (one object a line), then the text format in real time.
    assert cli_main(["--target", target, "stream", str(short.path), "--no-interim", "--format", "json"]) == 0
    objects = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["is_final"] for o in objects] == [True]
    (final,) = objects
    assert abs(final["start_time"] - short.spans[0][0]) <= TOLERANCE_S
    assert abs(final["end_time"] - short.spans[0][1]) <= TOLERANCE_S
    assert final["text"] == short.expected_text(final["start_time"], final["end_time"])
    assert final["language"] == "English"

    started = time.monotonic()
    assert cli_main(["--target", target, "stream", str(short.path), "--realtime"]) == 0
    elapsed = time.monotonic() - started
    assert elapsed >= short.duration_s - 0.05, (elapsed, short.duration_s)  # sent as it would be recorded
    assert elapsed < short.duration_s + 2.0
    lines = capsys.readouterr().out.splitlines()
    final_line = CLI_LINE_FORMAT.format(start=final["start_time"], end=final["end_time"], mark=" ", text=final["text"])
    assert lines[-1] == final_line
    # Interims (marked "~", replaced by the final) come before it; with interims on there is at least one.
    assert len(lines) >= 2, lines
    for line in lines[:-1]:
        match = CLI_LINE.fullmatch(line)
        assert match and match.group(3) == "~" and match.group(1) == f"{final['start_time']:.2f}", line

    assert cli_main(["--target", target, "stream", str(short.path), "--no-interim"]) == 0
    assert capsys.readouterr().out.splitlines() == [final_line]


def test_cli_stream_prints_a_line_per_final_of_several_sentences(
    target: str, speech: Speech, client: AsrClient, capsys: pytest.CaptureFixture[str]
) -> None:
    finals = list(client.stream(speech.path, realtime=False, interim_results=False))
    assert cli_main(["--target", target, "stream", str(speech.path), "--no-interim"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        CLI_LINE_FORMAT.format(start=f.start_time, end=f.end_time, mark=" ", text=f.text) for f in finals
    ]


# ---- a stream the server refuses ----


@pytest.mark.parametrize("realtime", [False, True])
def test_a_refused_stream_raises_the_typed_error(client: AsrClient, speech: Speech, realtime: bool) -> None:
    with pytest.raises(InvalidArgumentError, match="StreamingRecognize failed: INVALID_ARGUMENT: .*Klingon") as caught:
        list(client.stream(speech.path, language="Klingon", realtime=realtime))
    assert isinstance(caught.value, ValueError)
    assert caught.value.code.name == "INVALID_ARGUMENT" and "unknown language 'Klingon'" in caught.value.details


@pytest.mark.parametrize("realtime", [False, True])
async def test_a_refused_async_stream_raises_the_typed_error(target: str, speech: Speech, realtime: bool) -> None:
    async with AsyncAsrClient(target) as client:
        # Unpaced, the upload is still going when the server refuses the config: grpc.aio then reports INTERNAL
        # "Internal error from Core" (grpc/grpc#36066); the client must still give the server's status.
        for _ in range(5):
            with pytest.raises(InvalidArgumentError, match="StreamingRecognize failed: INVALID_ARGUMENT: .*Klingon"):
                async for _ in client.stream(speech.path, language="Klingon", realtime=realtime):
                    pass


def test_cli_stream_reports_a_refused_stream(target: str, short: Speech, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--target", target, "stream", str(short.path), "--language", "Klingon"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("asr-client: StreamingRecognize failed: INVALID_ARGUMENT: unknown language")


# ---- a stream the server ends for want of audio ----


def test_an_idle_stream_raises_out_of_range_naming_the_timeout(speech: Speech) -> None:
    from asr_client import OutOfRangeError
    from asr_server.config import StreamingConfig

    stalled = threading.Event()

    def frames() -> Iterator[np.ndarray]:
        yield speech.audio[: RATE // 2]
        # Then nothing, as a caller whose audio source went quiet: the server ends the stream.
        stalled.wait(timeout=10)

    fmt = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=RATE, channel_count=1)
    config = dataclasses.replace(fake_config(), streaming=StreamingConfig(idle_timeout_s=0.5))
    try:
        with threaded_server(config) as (_, address), AsrClient(address) as client:
            with pytest.raises(OutOfRangeError, match=r"--stream-idle-timeout-s=0\.5") as caught:
                list(client.stream(frames(), audio_format=fmt, realtime=False))
    finally:
        stalled.set()
    assert caught.value.code.name == "OUT_OF_RANGE" and not caught.value.retryable
