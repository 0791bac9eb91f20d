"""The Go, Java, C++ and Node example clients, built from scratch, against a real server: each checks health,
transcribes a WAV with Transcribe and uploads it as 20 ms LINEAR16 frames over TranscribeStream; both
transcripts must equal the Python client's. Once on the fake engine, once on the tiny random-weight checkpoint.

Then how each behaves when something goes wrong, on the fake engine: a failed call (an unknown language, a missing
bearer token, a TranscribeStream the server ends early, no server at all) is one line on stderr with the status
code's name and the server's message, and exit status 2; a short or malformed WAV file is a clear error and exit
status 1, never a crash. `--token` (or ASR_TOKEN) is sent as `authorization: Bearer TOKEN`.

The toolchains come from clients/setup.sh (Debian packages and npm; idempotent, so this is quick once installed).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trustme

from asr_client import AsrClient, RawAudio, tls_credentials
from tests.clients.servers import (
    REPO_ROOT,
    FlakyServicer,
    StreamRefusingServicer,
    fake_live_server,
    server_process,
)
from tests.helpers import tone, wav_bytes

pytestmark = pytest.mark.clients

CLIENTS_DIR = REPO_ROOT / "clients"
LANGUAGES = ("go", "java", "cpp", "node")
SAMPLES = tone(2.3, seed=5)
DURATION_MS = 2300
TOKEN = "cross-language-s3cret"
FAKE_ENGINE = ("--engine", "fake", "--no-warmup")
# What an uncaught error prints: a Go panic, a Java or Node stack trace, an uncaught C++ exception, Python's.
CRASH_MARKERS = ("panic", "goroutine ", "Exception in thread", "\tat ", "    at ", "at Object.", "terminate called",
                 "Traceback")

def _run(command: list[str], timeout_s: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "ASR_TOKEN"}  # a token only where a test gives one
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s, check=False,
                          env={**base, **(env or {})})


@pytest.fixture(scope="session")
def client_commands() -> dict[str, list[str]]:
    """Installs what is missing, builds the four clients at once, and says how to run each (the command's start;
    see client_command)."""
    setup = _run(["bash", str(CLIENTS_DIR / "setup.sh")], timeout_s=900)
    assert setup.returncode == 0, f"clients/setup.sh failed:\n{setup.stdout}\n{setup.stderr}"
    started = time.monotonic()
    with ThreadPoolExecutor(len(LANGUAGES)) as pool:
        builds = dict(zip(LANGUAGES, pool.map(
            lambda lang: _run(["bash", str(CLIENTS_DIR / lang / "build.sh")], timeout_s=600), LANGUAGES
        ), strict=True))
    for lang, build in builds.items():
        assert build.returncode == 0, f"clients/{lang}/build.sh failed:\n{build.stdout}\n{build.stderr}"
    print(f"built the {len(LANGUAGES)} clients in {time.monotonic() - started:.1f} s")
    classpath = (CLIENTS_DIR / "java" / "build" / "classpath").read_text().strip()
    return {
        "go": [str(CLIENTS_DIR / "go/build/asr-client-go")],
        "java": ["java", "-cp", classpath, "ai.qwenasr.example.AsrClientExample"],
        "cpp": [str(CLIENTS_DIR / "cpp/build/asr-client-cpp")],
        "node": ["node", str(CLIENTS_DIR / "node/client.js")],
    }


def run_client(
    program: list[str], target: str, wav: Path, *flags: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`PROGRAM --target TARGET FLAGS... WAV`, with ASR_TOKEN only as `env` sets it."""
    return _run([*program, "--target", target, *flags, str(wav)], timeout_s=120, env=env)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    with server_process(*FAKE_ENGINE) as target:
        with AsrClient(target) as client:
            client.wait_until_serving(timeout_s=240)
        yield target


@pytest.fixture(scope="module")
def auth_server() -> Iterator[str]:
    """The fake engine behind `--auth-token`: every call but health checks needs `authorization: Bearer TOKEN`."""
    with server_process(*FAKE_ENGINE, "--auth-token", TOKEN) as target:
        with AsrClient(target) as client:  # health checks need no token
            client.wait_until_serving(timeout_s=240)
        yield target


@pytest.fixture(scope="module", params=["fake-engine", "tiny-checkpoint"])
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "fake-engine":
        yield request.getfixturevalue("fake_server")
        return
    # Random weights: gibberish, but deterministic. A token cap keeps each call short on a CPU.
    tiny = request.getfixturevalue("tiny_checkpoints")
    args = ["--model", str(tiny.asr_hf), "--device", "cpu", "--max-new-tokens", "24"]
    with server_process(*args) as target:
        with AsrClient(target) as client:
            client.wait_until_serving(timeout_s=240)
        yield target


@pytest.fixture
def wav(tmp_path: Path) -> Path:
    path = tmp_path / "speech.wav"
    path.write_bytes(wav_bytes(SAMPLES))
    return path


def transcript_of(response: dict[str, Any]) -> tuple[str, str, int]:
    """Text, language and duration from a TranscribeResponse in proto3 JSON (default values are omitted)."""
    (transcript,) = response["transcripts"]
    return transcript.get("text", ""), transcript.get("language", ""), response.get("audioDurationMs", 0)


def assert_transcripts(lang: str, result: subprocess.CompletedProcess[str], want: tuple[str, str, int]) -> None:
    assert result.returncode == 0, f"{lang} client failed:\n{result.stderr}"
    output = json.loads(result.stdout)
    assert output["health"] == "SERVING"
    assert transcript_of(output["unary"]) == want, f"{lang} unary"
    assert transcript_of(output["stream"]) == want, f"{lang} stream"


def error_line(lang: str, result: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """The one line on stderr of a client that failed with `exit_code`, after checking that it did not crash."""
    assert result.returncode == exit_code, f"{lang}: exit status {result.returncode}\n{result.stderr}"
    assert result.stdout == ""
    for marker in CRASH_MARKERS:
        assert marker not in result.stderr, f"{lang} crashed:\n{result.stderr}"
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"asr-client-{lang}: ")
    return line


@pytest.mark.parametrize("lang", LANGUAGES)
def test_client_transcripts_equal_the_python_clients(
    lang: str, client_commands: dict[str, list[str]], server: str, wav: Path
) -> None:
    with AsrClient(server) as python:
        (expected,) = python.transcribe(wav)
        # The raw PCM the other clients stream (an int16 array would be peak-normalised, as qwen-asr does).
        (streamed,) = python.transcribe(RawAudio(wav.read_bytes()[44:], "linear16", 16_000))
    assert expected.text, "the Python client got no text"
    assert streamed.text == expected.text

    result = run_client(client_commands[lang], server, wav)
    assert_transcripts(lang, result, (expected.text, expected.language, DURATION_MS))
    # The programs print the whole response: the result fields added to the contract come through too.
    assert expected.confidence > 0, "the Python client got no confidence"
    output = json.loads(result.stdout)
    for call in ("unary", "stream"):
        (transcript,) = output[call]["transcripts"]
        assert transcript.get("languageCode", "") == expected.language_code, f"{lang} {call}"
        # float32 on the wire: each program prints it in a form that reads back to the same float32.
        assert np.float32(transcript.get("confidence", 0.0)) == np.float32(expected.confidence), f"{lang} {call}"


@pytest.mark.parametrize("lang", LANGUAGES)
def test_an_unknown_language_is_passed_through_and_refused(
    lang: str, client_commands: dict[str, list[str]], fake_server: str, wav: Path
) -> None:
    result = run_client(client_commands[lang], fake_server, wav, "--language", "Klingon")
    line = error_line(lang, result, exit_code=2)
    assert "Transcribe failed: INVALID_ARGUMENT: " in line
    assert "'Klingon'" in line


@pytest.mark.parametrize("lang", LANGUAGES)
def test_without_a_token_calls_are_unauthenticated(
    lang: str, client_commands: dict[str, list[str]], auth_server: str, wav: Path
) -> None:
    result = run_client(client_commands[lang], auth_server, wav)
    line = error_line(lang, result, exit_code=2)
    assert "Transcribe failed: UNAUTHENTICATED: " in line
    assert "bearer token" in line  # the server's message

    wrong = run_client(client_commands[lang], auth_server, wav, "--token", "wrong")
    assert "UNAUTHENTICATED" in error_line(lang, wrong, exit_code=2)


@pytest.mark.parametrize("via", ["flag", "env"])
@pytest.mark.parametrize("lang", LANGUAGES)
def test_the_token_is_sent_as_bearer_metadata(
    lang: str, via: str, client_commands: dict[str, list[str]], auth_server: str, wav: Path
) -> None:
    with AsrClient(auth_server, auth_token=TOKEN) as python:
        (expected,) = python.transcribe(wav)
    if via == "flag":
        result = run_client(client_commands[lang], auth_server, wav, "--token", TOKEN)
    else:
        result = run_client(client_commands[lang], auth_server, wav, env={"ASR_TOKEN": TOKEN})
    assert_transcripts(lang, result, (expected.text, expected.language, DURATION_MS))


@pytest.mark.parametrize("lang", LANGUAGES)
def test_a_stream_the_server_ends_early_reports_the_servers_status(
    lang: str, client_commands: dict[str, list[str]], tmp_path: Path
) -> None:
    # 60 s of audio (1.9 MB in 3000 frames): the client is still sending when the server's status arrives, and
    # must report that status. grpc-go's Send returns a bare io.EOF then (with 10 s it was a race; with 60 s the
    # Go client from before this test printed "send audio: EOF" every time).
    long_wav = tmp_path / "long.wav"
    long_wav.write_bytes(wav_bytes(tone(60.0, seed=3)))
    with fake_live_server(StreamRefusingServicer(), health=True) as target:
        result = run_client(client_commands[lang], target, long_wav)
    line = error_line(lang, result, exit_code=2)
    assert f"TranscribeStream failed: FAILED_PRECONDITION: {StreamRefusingServicer.MESSAGE}" in line
    assert "EOF" not in line


@pytest.mark.parametrize("lang", LANGUAGES)
def test_the_retry_policy_retries_unavailable(lang: str, client_commands: dict[str, list[str]], wav: Path) -> None:
    """Every client's service-config retryPolicy: a server that fails the first Transcribe and the first
    TranscribeStream with UNAVAILABLE (a replica restarting) is asked again, and the client prints the answers."""
    servicer = FlakyServicer(failures=1)
    with fake_live_server(servicer, health=True) as target:
        result = run_client(client_commands[lang], target, wav)
    assert result.returncode == 0, f"{lang} client failed:\n{result.stderr}"
    output = json.loads(result.stdout)
    assert transcript_of(output["unary"]) == ("attempt 2", "English", 1000)
    assert transcript_of(output["stream"]) == ("attempt 2", "English", 1000)
    assert servicer.attempts == {"Transcribe": 2, "TranscribeStream": 2}


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The fake engine on a TLS port (a trustme CA and a certificate for 127.0.0.1); yields the target and the CA."""
    pki = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.cert_chain_pems[0].write_to_path(str(pki / "server.pem"))
    leaf.private_key_pem.write_to_path(str(pki / "server.key"))
    ca.cert_pem.write_to_path(str(pki / "ca.pem"))
    tls = ("--tls-cert-file", str(pki / "server.pem"), "--tls-key-file", str(pki / "server.key"))
    with server_process(*FAKE_ENGINE, *tls) as target:
        with AsrClient(target, tls_credentials(ca_file=str(pki / "ca.pem"))) as client:
            client.wait_until_serving(timeout_s=240)
        yield target, pki / "ca.pem"


def test_the_go_client_connects_over_tls_with_a_ca_file(
    client_commands: dict[str, list[str]], tls_server: tuple[str, Path], wav: Path
) -> None:
    target, ca_file = tls_server
    with AsrClient(target, tls_credentials(ca_file=str(ca_file))) as python:
        (expected,) = python.transcribe(wav)
    result = run_client(client_commands["go"], target, wav, "--ca-file", str(ca_file))
    assert_transcripts("go", result, (expected.text, expected.language, DURATION_MS))
    # Plaintext to the TLS port is refused; so is a CA that did not sign the server's certificate.
    plaintext = run_client(client_commands["go"], target, wav)
    assert "UNAVAILABLE" in error_line("go", plaintext, exit_code=2)
    other_ca = wav.parent / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    untrusted = run_client(client_commands["go"], target, wav, "--ca-file", str(other_ca))
    assert "UNAVAILABLE" in error_line("go", untrusted, exit_code=2)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_no_server_is_unavailable(lang: str, client_commands: dict[str, list[str]], wav: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_client(client_commands[lang], f"127.0.0.1:{port}", wav)
    assert "health check failed: UNAVAILABLE: " in error_line(lang, result, exit_code=2)


def _chunk(kind: bytes, body: bytes, size: int | None = None) -> bytes:
    padding = b"\0" if len(body) % 2 else b""
    return kind + struct.pack("<I", len(body) if size is None else size) + body + padding


def _riff(*chunks: bytes) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _fmt(channels: int = 1, rate: int = 16_000, bits: int = 16, tag: int = 1) -> bytes:
    block = channels * bits // 8
    return struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)


def _extensible_fmt(channels: int = 1, rate: int = 16_000, subformat: int = 1) -> bytes:
    guid_tail = bytes([0, 0, 0, 0, 0x10, 0, 0x80, 0, 0, 0xAA, 0, 0x38, 0x9B, 0x71])
    extension = struct.pack("<HHIH", 22, 16, 0x4, subformat) + guid_tail  # cbSize, valid bits, channel mask, GUID
    return _fmt(channels, rate, tag=0xFFFE) + extension


PCM = wav_bytes(SAMPLES)[44:]
MALFORMED_WAVS = {
    "first 30 bytes": wav_bytes(SAMPLES)[:30],
    "empty": b"",
    "not RIFF": b"ID3\x04" + bytes(100),
    "RIFF header only": _riff(),
    "fmt chunk of 14 bytes": _riff(_chunk(b"fmt ", _fmt()[:14]), _chunk(b"data", PCM)),
    "fmt chunk past the end": _riff(_chunk(b"fmt ", _fmt(), size=0xFFFFFFF0)),
    "data before fmt": _riff(_chunk(b"data", PCM), _chunk(b"fmt ", _fmt())),
    "no data chunk": _riff(_chunk(b"fmt ", _fmt())),
    "zero channels": _riff(_chunk(b"fmt ", _fmt(channels=0)), _chunk(b"data", PCM)),
    "zero sample rate": _riff(_chunk(b"fmt ", _fmt(rate=0)), _chunk(b"data", PCM)),
    "8-bit": _riff(_chunk(b"fmt ", _fmt(bits=8)), _chunk(b"data", PCM)),
    "float": _riff(_chunk(b"fmt ", _fmt(bits=32, tag=3)), _chunk(b"data", PCM)),
    "short extensible fmt": _riff(_chunk(b"fmt ", _extensible_fmt()[:30]), _chunk(b"data", PCM)),
    "extensible float": _riff(_chunk(b"fmt ", _extensible_fmt(subformat=3)), _chunk(b"data", PCM)),
}


@pytest.mark.parametrize("case", MALFORMED_WAVS)
@pytest.mark.parametrize("lang", LANGUAGES)
def test_a_malformed_wav_is_a_clear_error_not_a_crash(
    lang: str, case: str, client_commands: dict[str, list[str]], fake_server: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.wav"
    path.write_bytes(MALFORMED_WAVS[case])
    line = error_line(lang, run_client(client_commands[lang], fake_server, path), exit_code=1)
    assert f"{path}: not a usable WAV file: " in line


@pytest.mark.parametrize("lang", LANGUAGES)
def test_a_missing_file_and_bad_arguments_exit_1(
    lang: str, client_commands: dict[str, list[str]], fake_server: str, tmp_path: Path
) -> None:
    error_line(lang, run_client(client_commands[lang], fake_server, tmp_path / "missing.wav"), exit_code=1)
    error_line(lang, _run([*client_commands[lang], "--target"], timeout_s=60), exit_code=1)
    error_line(lang, _run(client_commands[lang], timeout_s=60), exit_code=1)  # no file


@pytest.mark.parametrize("lang", LANGUAGES)
def test_wave_format_extensible_with_16_bit_samples_is_read(
    lang: str, client_commands: dict[str, list[str]], fake_server: str, tmp_path: Path
) -> None:
    # A LIST chunk of odd length before the data checks that the chunk walk skips its pad byte.
    path = tmp_path / "extensible.wav"
    path.write_bytes(_riff(_chunk(b"fmt ", _extensible_fmt()), _chunk(b"LIST", b"INFOodd"), _chunk(b"data", PCM)))
    with AsrClient(fake_server) as python:
        (expected,) = python.transcribe(wav_bytes(SAMPLES))
    assert expected.text
    result = run_client(client_commands[lang], fake_server, path)
    assert_transcripts(lang, result, (expected.text, expected.language, DURATION_MS))
