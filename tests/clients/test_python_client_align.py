"""The Python client's `align` (shaped like `qwen_asr.Qwen3ForcedAligner.align`) and `asr-client align`, against
the real server with a stub aligner."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from asr_client import AsrClient, AsyncAsrClient
from asr_client.cli import main as cli_main
from asr_client.errors import FailedPreconditionError, InvalidArgumentError
from tests.clients.servers import StubAligner, stub_word_times, threaded_server
from tests.helpers import fake_config, tone, wav_bytes


@pytest.fixture(scope="module")
def aligner() -> StubAligner:
    return StubAligner()


@pytest.fixture(scope="module")
def target(aligner: StubAligner) -> Iterator[str]:
    with threaded_server(fake_config(), aligner=aligner) as (_, address):
        yield address


def test_align_one_and_a_batch_like_the_reference(target: str, aligner: StubAligner, tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    path.write_bytes(wav_bytes(tone(2.0, seed=1)))
    with AsrClient(target) as client:
        (one,) = client.align(str(path), "hello big world", "en")
        two = client.align([(tone(1.0, seed=2), 16000), path.read_bytes()], ["one two", "three"], "Chinese")
    assert [(i.text, i.start_time, i.end_time) for i in one] == stub_word_times("hello big world", 2000)
    assert [[(i.text, i.start_time, i.end_time) for i in r] for r in two] == [
        stub_word_times("one two", 1000),
        stub_word_times("three", 2000),
    ]
    assert ("hello big world", "English") in aligner.calls and ("three", "Chinese") in aligner.calls


def test_align_errors_are_typed_and_say_why(target: str) -> None:
    with AsrClient(target) as client:
        with pytest.raises(InvalidArgumentError, match="Spanish"):
            client.align((tone(1.0), 16000), "hola", "Thai")
        with pytest.raises(InvalidArgumentError, match="text is empty"):
            client.align((tone(1.0), 16000), "", "en")
        with pytest.raises(ValueError, match="batch size mismatch"):
            client.align([(tone(1.0), 16000)] * 2, ["a", "b", "c"], "en")
    with threaded_server(fake_config()) as (_, address), AsrClient(address) as client:
        with pytest.raises(FailedPreconditionError, match="--aligner-model"):
            client.align((tone(1.0), 16000), "hello", "en")


def test_cli_align_prints_each_word_or_json(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.wav"
    path.write_bytes(wav_bytes(tone(2.0, seed=3)))
    assert cli_main(["--target", target, "align", str(path), "--text", "hello world"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{s:.3f}\t{e:.3f}\t{w}" for w, s, e in stub_word_times("hello world", 2000)]
    text_file = tmp_path / "t.txt"
    text_file.write_text("bonjour le monde", encoding="utf-8")
    assert cli_main(["--target", target, "align", str(path), "--text-file", str(text_file), "--language", "fr",
                     "--format", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert [(i["text"], i["start_time"], i["end_time"]) for i in items] == stub_word_times("bonjour le monde", 2000)
    assert cli_main(["--target", target, "align", str(path), "--text", "x", "--language", "Klingon"]) == 1
    assert "Cantonese" in capsys.readouterr().err


async def test_the_asyncio_client_aligns_the_same(target: str) -> None:
    async with AsyncAsrClient(target) as client:
        results = await client.align([(tone(1.0, seed=2), 16000), (tone(2.0, seed=2), 16000)], "a b c", "en")
    assert [[(i.text, i.start_time, i.end_time) for i in r] for r in results] == [
        stub_word_times("a b c", 1000),
        stub_word_times("a b c", 2000),
    ]
