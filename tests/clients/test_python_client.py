"""The Python client against the real server (fake engine, stub aligner) and a fake live-streaming servicer:
every audio form, batches, broadcasting, timestamps, SRT/VTT from the CLI, deadlines, live streaming, asyncio."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import re
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from asr_client import (
    AsrClient,
    AsyncAsrClient,
    AudioLike,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from asr_client.cli import main as cli_main
from asr_server.engine.fake import FakeEngine, fake_transcript
from asr_server.engine.types import DecodeOptions, DecodeRequest
from qwenasr.v1 import asr_pb2 as pb
from tests.clients.servers import (
    FakeLiveServicer,
    OldServerServicer,
    StubAligner,
    fake_live_server,
    stub_word_times,
    threaded_server,
)
from tests.helpers import fake_config, tone, wav_bytes, with_limits, with_server

RATE = 16_000


def exact_samples(duration_s: float, seed: int) -> np.ndarray:
    """Float samples that survive a round trip through 16-bit PCM unchanged, so every form decodes alike."""
    pcm = np.clip(np.round(tone(duration_s, seed=seed) * 32767), -32768, 32767).astype(np.int16)
    return (pcm / 32768.0).astype(np.float32)


def expected_text(samples: np.ndarray) -> str:
    return fake_transcript(DecodeRequest("x", samples, DecodeOptions(None, "", 4096)))[0]


SAMPLES = exact_samples(2.5, seed=11)
TEXT = expected_text(SAMPLES)
WAV = wav_bytes(SAMPLES)


class Engines:
    """The fake engine cores a server made, and every request they decoded."""

    def __init__(self, **engine: float) -> None:
        self.cores: list[FakeEngine] = []
        self.requests: list[DecodeRequest] = []
        self._engine = engine

    def __call__(self) -> FakeEngine:
        core = FakeEngine(max_batch_size=16, on_step=self.requests.extend, **self._engine)  # type: ignore[arg-type]
        self.cores.append(core)
        return core


@pytest.fixture(scope="module")
def engines() -> Engines:
    return Engines(batch_delay_ms=30)


@pytest.fixture(scope="module")
def target(engines: Engines) -> Iterator[str]:
    config = fake_config(max_inference_batch_size=16, max_batch_wait_ms=50)
    with threaded_server(config, core_factory=engines, aligner=StubAligner()) as (_, address):
        yield address


@pytest.fixture()
def client(target: str) -> Iterator[AsrClient]:
    with AsrClient(target, timeout_s=30) as c:
        yield c


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    """A loopback HTTP server with the test WAV at /speech.wav (https goes through the same code)."""
    root = Path(__file__).parent  # any directory; the handler serves from memory
    handler = functools.partial(_WavHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/speech.wav"
    server.shutdown()


@pytest.fixture(scope="module")
def https_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The same WAV over loopback TLS with a self-signed certificate for 127.0.0.1 made here by `openssl`;
    yields the URL and the certificate (PEM)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"openssl could not make a self-signed certificate: {made.stderr.strip()[-300:]}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    handler = functools.partial(_WavHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/speech.wav", cert
    server.shutdown()


class _WavHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "audio/wav")
        self.send_header("Content-Length", str(len(WAV)))
        self.end_headers()
        self.wfile.write(WAV)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def test_every_audio_form_gives_the_same_transcript(client: AsrClient, tmp_path: Path, http_url: str) -> None:
    path = tmp_path / "speech.wav"
    path.write_bytes(WAV)
    # int arrays are peak-normalised as the reference does: test_python_client_reference.py.
    forms: dict[str, AudioLike] = {
        "str path": str(path),
        "Path": path,
        "http URL": http_url,
        "data URL": "data:audio/wav;base64," + base64.b64encode(WAV).decode(),
        "bytes": WAV,
        "float array": (SAMPLES, RATE),
        "float64 array": (SAMPLES.astype(np.float64), RATE),
        "stereo array": (np.stack([SAMPLES, SAMPLES], axis=1), RATE),
    }
    for name, audio in forms.items():
        (result,) = client.transcribe(audio)
        assert (result.text, result.language, result.duration) == (TEXT, "English", 2.5), name
        assert result.time_stamps is None


def test_an_https_url_is_fetched_over_tls_once_its_certificate_is_trusted(
    client: AsrClient, https_url: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, cert = https_url
    with pytest.raises(ValueError, match=r"cannot fetch audio from https://127\.0\.0\.1:\d+/speech\.wav: .*CERTIFICATE_VERIFY_FAILED"):
        client.transcribe(url)
    # The client takes no CA or SSL context for fetching URLs: it uses Python's default HTTPS context, which
    # trusts the certificates that OpenSSL's SSL_CERT_FILE names.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    (result,) = client.transcribe(url)
    assert (result.text, result.language, result.duration) == (TEXT, "English", 2.5)


def test_a_list_is_sent_concurrently_and_answered_in_order(client: AsrClient, engines: Engines) -> None:
    clips = [exact_samples(0.5 + 0.5 * i, seed=20 + i) for i in range(6)]
    before = sum(len(core.batches) for core in engines.cores)
    results = client.transcribe([(c, RATE) for c in clips[:3]] + [wav_bytes(c) for c in clips[3:]])
    assert [r.text for r in results] == [expected_text(c) for c in clips]
    batches = [b for core in engines.cores for b in core.batches][before:]
    assert max(len(b) for b in batches) >= 2, batches  # the server batched calls that were in flight together


def test_other_rates_reach_the_server(client: AsrClient) -> None:
    (result,) = client.transcribe((tone(1.5, rate_hz=44_100, seed=3), 44_100))
    assert result.duration == 1.5 and result.text.count("w") == 3


def test_scalar_context_and_language_apply_to_every_audio(client: AsrClient, engines: Engines) -> None:
    engines.requests.clear()
    results = client.transcribe([WAV, WAV, WAV], context="Qwen, ASR", language="fr")
    assert [r.language for r in results] == ["French"] * 3
    assert [r.options.context for r in engines.requests] == ["Qwen, ASR"] * 3
    results = client.transcribe([WAV, WAV], context=["one", "two"], language=["de", None])
    assert [r.language for r in results] == ["German", "English"]
    assert sorted(r.options.context for r in engines.requests[3:]) == ["one", "two"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context": ["a", "b", "c"]}, "2 audio inputs but 3 values for context"),
        ({"language": ["en"] * 3}, "2 audio inputs but 3 values for language"),
    ],
)
def test_a_length_mismatch_is_a_value_error(client: AsrClient, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        client.transcribe([WAV, WAV], **kwargs)  # type: ignore[arg-type]


def test_an_unknown_language_is_a_value_error_from_the_server(client: AsrClient) -> None:
    with pytest.raises(InvalidArgumentError, match="INVALID_ARGUMENT: .*Klingon") as caught:
        client.transcribe(WAV, language="Klingon")
    assert isinstance(caught.value, ValueError)


def test_time_stamps_are_the_aligner_words_in_seconds(client: AsrClient) -> None:
    (result,) = client.transcribe(WAV, return_time_stamps=True, language="English")
    assert result.text == TEXT
    assert result.time_stamps is not None
    got = [(w.text, w.start_time, w.end_time) for w in result.time_stamps]
    assert got == stub_word_times(TEXT, 2500)


def test_large_audio_goes_over_transcribe_stream() -> None:
    # This server takes at most 200 kB per message; 10 s of FLOAT32 is 640 kB.
    samples = exact_samples(10.0, seed=5)
    with threaded_server(with_limits(fake_config(), max_message_bytes=200_000)) as (_, address):
        with AsrClient(address, stream_threshold_bytes=100_000) as client:
            (result,) = client.transcribe((samples, RATE))
        assert result.text == expected_text(samples)
        with AsrClient(address, stream_threshold_bytes=10_000_000) as client:
            with pytest.raises(ResourceExhaustedError, match="200000"):
                client.transcribe((samples, RATE))


# One request decodes at a time and holds the only queue place for 400 ms; audio over 3 s is refused outright.
QUEUE_OF_ONE = with_limits(
    fake_config(max_inference_batch_size=1, max_batch_wait_ms=0, max_queued_requests=1, fake_batch_delay_ms=400),
    max_audio_duration_s=3,
)
LONG_WAV = wav_bytes(exact_samples(4.0, seed=2))


def test_retryable_follows_the_servers_retry_info_not_the_status_code() -> None:
    # retries=False: the errors themselves, not gRPC's retries of them (test_python_client_retries.py).
    with threaded_server(QUEUE_OF_ONE) as (_, address), AsrClient(address, retries=False) as client:
        with pytest.raises(ResourceExhaustedError, match="max_audio_duration_s=3") as too_long:
            client.transcribe(LONG_WAV)
        assert too_long.value.retryable is False and too_long.value.retry_delay_s is None
        with pytest.raises(ResourceExhaustedError, match="queue is full") as full:
            client.transcribe([WAV] * 4)
        assert full.value.retryable is True and full.value.retry_delay_s == 1.0
    # A server that cannot be reached sends no RetryInfo, and is still worth retrying.
    with AsrClient(address, timeout_s=2.0, retries=False) as gone:
        with pytest.raises(UnavailableError) as unreachable:
            gone.transcribe(WAV)
    assert unreachable.value.retryable is True and unreachable.value.retry_delay_s is None


def test_an_expired_deadline_raises_promptly_instead_of_hanging() -> None:
    slow = Engines(batch_delay_ms=1200)
    with threaded_server(fake_config(), core_factory=slow) as (_, address):
        with AsrClient(address, timeout_s=0.3) as client:
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError, match=r"within the 0\.3 s deadline") as caught:
                client.transcribe(WAV)
            assert time.monotonic() - started < 1.0  # the engine would answer after 1.2 s
            assert isinstance(caught.value, TimeoutError)
            # Without an aligner, timestamps are a precondition failure with the server's hint.
            with pytest.raises(FailedPreconditionError, match="aligner"):
                AsrClient(address).transcribe(WAV, return_time_stamps=True)


def test_auth_token_is_sent_as_bearer_metadata() -> None:
    with threaded_server(with_server(fake_config(), auth_token="s3cret")) as (_, address):
        with pytest.raises(UnauthenticatedError):
            AsrClient(address).transcribe(WAV)
        with AsrClient(address, auth_token="s3cret") as client:
            assert client.transcribe(WAV)[0].text == TEXT
            assert client.server_info().api_version == "qwenasr.v1"


def test_health_info_and_protobuf_level_calls(client: AsrClient, tmp_path: Path) -> None:
    client.wait_until_serving(timeout_s=5)
    assert client.health() == "SERVING"
    assert len(client.server_info().languages) == 30
    path = tmp_path / "a.wav"
    path.write_bytes(WAV)
    response = client.transcribe_file(path, language="en")
    assert response.transcripts[0].text == TEXT
    assert response.model_id == "fake"


# ---- the CLI ----

SRT_BLOCK = re.compile(r"^(\d+)\n(\d{2}:\d{2}:\d{2},\d{3}) --> (\d{2}:\d{2}:\d{2},\d{3})\n(.+)$")


def seconds_of(stamp: str) -> float:
    hours, minutes, rest = stamp.replace(",", ".").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(rest)


def test_cli_writes_srt_and_vtt_from_word_timestamps(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "speech.wav"
    path.write_bytes(WAV)
    assert cli_main(["--target", target, "transcribe", str(path), "--timestamps", "--format", "srt"]) == 0
    blocks = capsys.readouterr().out.strip().split("\n\n")
    parsed = [SRT_BLOCK.match(block) for block in blocks]
    assert all(parsed), blocks
    words = stub_word_times(TEXT, 2500)
    assert [int(m.group(1)) for m in parsed if m] == list(range(1, len(blocks) + 1))
    assert " ".join(m.group(4).replace("\n", " ") for m in parsed if m) == TEXT
    first, last = parsed[0], parsed[-1]
    assert first and last
    assert seconds_of(first.group(2)) == words[0][1]
    assert seconds_of(last.group(3)) == words[-1][2]

    assert cli_main(["--target", target, "transcribe", str(path), "--timestamps", "--format", "vtt"]) == 0
    vtt = capsys.readouterr().out.splitlines()
    assert vtt[0] == "WEBVTT" and vtt[1] == ""
    times = [line for line in vtt if "-->" in line]
    assert times and all(re.fullmatch(r"\d{2}:\d{2}:\d{2}\.\d{3} --> \d{2}:\d{2}:\d{2}\.\d{3}", t) for t in times)
    assert times[0].startswith("00:00:00.000 --> ")


def test_cli_transcribes_several_files_as_text_json_and_files(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = exact_samples(1.0, seed=4)
    (tmp_path / "a.wav").write_bytes(WAV)
    (tmp_path / "b.wav").write_bytes(wav_bytes(other))
    files = [str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]
    assert cli_main(["--target", target, "transcribe", *files, "--language", "en"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{files[0]}\t[English]\t{TEXT}",
        f"{files[1]}\t[English]\t{expected_text(other)}",
    ]
    assert cli_main(["--target", target, "transcribe", *files, "--format", "json", "--timestamps"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["text"] for d in data] == [TEXT, expected_text(other)]
    assert data[0]["time_stamps"][0] == dict(zip(("text", "start_time", "end_time"), stub_word_times(TEXT, 2500)[0],
                                                  strict=True))
    out_dir = tmp_path / "subs"
    assert cli_main(["--target", target, "transcribe", *files, "--format", "srt", "--timestamps",
                     "--output-dir", str(out_dir)]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.srt", "b.srt"]
    assert (out_dir / "a.srt").read_text().startswith("1\n00:00:00,000 --> 00:00:0")


def test_cli_health_info_and_errors(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--target", target, "health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert cli_main(["--target", target, "info"]) == 0
    assert json.loads(capsys.readouterr().out)["apiVersion"] == "qwenasr.v1"
    assert cli_main(["--target", target, "transcribe", "/no/such.wav"]) == 2  # a file failed
    assert "asr-client: /no/such.wav: no such audio file: /no/such.wav" in capsys.readouterr().err


def test_cli_stream_says_clearly_when_the_server_does_not_serve_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.wav"
    path.write_bytes(WAV)
    with fake_live_server(OldServerServicer()) as address:  # an older server: UNIMPLEMENTED
        assert cli_main(["--target", address, "stream", str(path)]) == 1
    err = capsys.readouterr().err
    assert "does not serve StreamingRecognize" in err and "UNIMPLEMENTED" in err and "asr-client transcribe" in err


# ---- live streaming (against a fake StreamingRecognize) ----


def test_stream_sends_a_file_at_real_time_pace_and_yields_interim_and_final_results(tmp_path: Path) -> None:
    servicer = FakeLiveServicer(interim_every_ms=200)
    short = exact_samples(0.6, seed=8)
    path = tmp_path / "short.wav"
    path.write_bytes(wav_bytes(short))
    with fake_live_server(servicer) as address, AsrClient(address) as client:
        started = time.monotonic()
        results = list(client.stream(path, language="en", context="names", return_time_stamps=True, realtime=True))
        elapsed = time.monotonic() - started
    assert elapsed >= 0.55  # 0.6 s of audio in 30 frames of 20 ms, each sent once "recorded"
    assert [r.text for r in results] == ["heard 200 ms", "heard 400 ms", "heard 600 ms", "final 19200 bytes"]
    assert [r.is_final for r in results] == [False, False, False, True]
    final = results[-1]
    assert (final.start_time, final.end_time, final.language, final.stability) == (0.0, 0.6, "en", 1.0)
    assert final.time_stamps is not None and [w.text for w in final.time_stamps] == ["heard", "everything"]
    assert bytes(servicer.received) == np.round(short * 32768).astype("<i2").tobytes()
    assert {size for _, size in servicer.arrivals} == {640}
    config = servicer.configs[0]
    assert config.interim_results and config.config.context == "names" and config.config.return_word_timestamps
    assert config.config.audio_format == pb.AudioFormat(
        encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=RATE, channel_count=1
    )


def test_stream_without_realtime_sends_at_once_and_takes_frame_iterators() -> None:
    servicer = FakeLiveServicer()
    frames = [np.full(320, 0.25, np.float32) for _ in range(50)]  # 1 s of 20 ms float frames
    fmt = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_FLOAT32, sample_rate_hz=RATE, channel_count=1)
    with fake_live_server(servicer) as address, AsrClient(address) as client:
        started = time.monotonic()
        results = list(client.stream(iter(frames), audio_format=fmt, realtime=False, interim_results=False))
        assert time.monotonic() - started < 0.8  # 1 s of audio: not paced
    assert [r.text for r in results] == ["final 64000 bytes"]
    assert results[0].time_stamps is None


def test_a_bad_frame_from_the_callers_iterator_reaches_the_caller() -> None:
    def frames() -> Iterator[bytes]:
        yield b"\0" * 640
        raise OSError("microphone unplugged")

    with fake_live_server(FakeLiveServicer()) as address, AsrClient(address) as client:
        with pytest.raises(OSError, match="microphone unplugged"):
            list(client.stream(frames(), realtime=False))


def test_stream_raises_unimplemented_from_a_server_without_it() -> None:
    with fake_live_server(OldServerServicer()) as address, AsrClient(address) as client:
        with pytest.raises(UnimplementedError, match="StreamingRecognize failed: UNIMPLEMENTED") as caught:
            list(client.stream(WAV, realtime=False))
    assert isinstance(caught.value, NotImplementedError)


# ---- asyncio ----


async def test_async_client_transcribes_batches_and_streams(target: str, http_url: str) -> None:
    async with AsyncAsrClient(target) as client:
        assert await client.health() == "SERVING"
        results = await client.transcribe([WAV, (SAMPLES, RATE), http_url], language="en", return_time_stamps=True)
        assert [r.text for r in results] == [TEXT] * 3
        assert results[0].time_stamps is not None and len(results[0].time_stamps) == len(TEXT.split())
        with pytest.raises(ValueError, match="batch size mismatch"):
            await client.transcribe([WAV, WAV], context=["a", "b", "c"])
        assert (await client.server_info()).model_id == "fake"

    servicer = FakeLiveServicer()

    async def frames() -> Iterator[bytes]:  # type: ignore[misc]
        for _ in range(15):
            yield b"\1\0" * 320

    with fake_live_server(servicer) as address:
        async with AsyncAsrClient(address) as live:
            started = time.monotonic()
            texts = [r.text async for r in live.stream(frames(), realtime=True)]
            assert time.monotonic() - started >= 0.28
    assert texts == ["heard 200 ms", "final 9600 bytes"]
    with fake_live_server(OldServerServicer()) as address:
        async with AsyncAsrClient(address) as old:
            with pytest.raises(UnimplementedError):
                async for _ in old.stream(WAV, realtime=False):
                    pass


async def test_async_retryable_follows_the_servers_retry_info() -> None:
    with threaded_server(QUEUE_OF_ONE) as (_, address):
        async with AsyncAsrClient(address, retries=False) as client:
            with pytest.raises(ResourceExhaustedError, match="max_audio_duration_s=3") as too_long:
                await client.transcribe(LONG_WAV)
            assert too_long.value.retryable is False and too_long.value.retry_delay_s is None
            with pytest.raises(ResourceExhaustedError, match="queue is full") as full:
                await client.transcribe([WAV] * 4)
            assert full.value.retryable is True and full.value.retry_delay_s == 1.0


async def test_async_deadline_raises_promptly() -> None:
    with threaded_server(fake_config(), core_factory=Engines(batch_delay_ms=1200)) as (_, address):
        async with AsyncAsrClient(address, timeout_s=0.3) as client:
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                await client.transcribe(WAV)
            assert time.monotonic() - started < 1.0  # the engine would answer after 1.2 s
