"""The Go, Java, C++ and Node example clients, built from scratch, against a real server: each checks health,
transcribes a WAV with Transcribe and uploads it as 20 ms LINEAR16 frames over TranscribeStream; both
transcripts must equal the Python client's. Once on the fake engine, once on the tiny random-weight checkpoint.

The toolchains come from clients/setup.sh (Debian packages and npm; idempotent, so this is quick once installed).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asr_client import AsrClient
from tests.clients.servers import REPO_ROOT, server_process
from tests.helpers import tone, wav_bytes

pytestmark = pytest.mark.clients

CLIENTS_DIR = REPO_ROOT / "clients"
LANGUAGES = ("go", "java", "cpp", "node")
SAMPLES = tone(2.3, seed=5)
DURATION_MS = 2300

Command = Callable[[str, Path], list[str]]


def _run(command: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)


@pytest.fixture(scope="session")
def client_commands() -> dict[str, Command]:
    """Installs what is missing, builds the four clients at once, and says how to run each."""
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
        "go": lambda target, wav: [str(CLIENTS_DIR / "go/build/asr-client-go"), "--target", target, str(wav)],
        "java": lambda target, wav: ["java", "-cp", classpath, "ai.qwenasr.example.AsrClientExample",
                                     "--target", target, str(wav)],
        "cpp": lambda target, wav: [str(CLIENTS_DIR / "cpp/build/asr-client-cpp"), "--target", target, str(wav)],
        "node": lambda target, wav: ["node", str(CLIENTS_DIR / "node/client.js"), "--target", target, str(wav)],
    }


@pytest.fixture(scope="module", params=["fake-engine", "tiny-checkpoint"])
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "fake-engine":
        args = ["--engine", "fake", "--no-warmup"]
    else:
        # Random weights: gibberish, but deterministic. A token cap keeps each call short on a CPU.
        tiny = request.getfixturevalue("tiny_checkpoints")
        args = ["--model", str(tiny.asr_hf), "--device", "cpu", "--max-new-tokens", "24"]
    with server_process(*args) as target:
        with AsrClient(target) as client:
            client.wait_until_serving(timeout_s=240)
        yield target


def transcript_of(response: dict[str, Any]) -> tuple[str, str, int]:
    """Text, language and duration from a TranscribeResponse in proto3 JSON (default values are omitted)."""
    (transcript,) = response["transcripts"]
    return transcript.get("text", ""), transcript.get("language", ""), response.get("audioDurationMs", 0)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_client_transcripts_equal_the_python_clients(
    lang: str, client_commands: dict[str, Command], server: str, tmp_path: Path
) -> None:
    wav = tmp_path / "speech.wav"
    wav.write_bytes(wav_bytes(SAMPLES))
    with AsrClient(server) as python:
        (expected,) = python.transcribe(wav)
        pcm = np.frombuffer(wav.read_bytes()[44:], "<i2")
        (streamed,) = python.transcribe((pcm, 16_000))  # the raw PCM the other clients stream
    assert expected.text, "the Python client got no text"
    assert streamed.text == expected.text

    result = _run(client_commands[lang](server, wav), timeout_s=120)
    assert result.returncode == 0, f"{lang} client failed:\n{result.stderr}"
    output = json.loads(result.stdout)
    assert output["health"] == "SERVING"
    want = (expected.text, expected.language, DURATION_MS)
    assert transcript_of(output["unary"]) == want, f"{lang} unary"
    assert transcript_of(output["stream"]) == want, f"{lang} stream"
