"""`asr-client` on real work: raw telephony files (--encoding/--sample-rate/--channels/--separate-channels) on
transcribe and stream, per-file results and errors in a batch (exit 2 when a file failed), --format jsonl, and a
progress bar on stderr only when it is a terminal. Against the real server (fake engine) or a fake live servicer."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from asr_client import AsrClient, RawAudio
from asr_client.cli import main as cli_main
from qwenasr.v1 import asr_pb2 as pb
from tests.clients.servers import REPO_ROOT, FakeLiveServicer, fake_live_server, threaded_server
from tests.clients.test_python_client import WAV, exact_samples, expected_text
from tests.helpers import fake_config, tone, wav_bytes


def mulaw_encode(samples: np.ndarray) -> bytes:
    """G.711 mu-law (ITU-T G.711, the bias-33 segment encoder), one byte per sample."""
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype(np.int32) >> 2  # 14-bit magnitude
    sign = np.where(pcm < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm), 8158) + 33
    exponent = np.floor(np.log2(magnitude)).astype(np.int32) - 5
    mantissa = (magnitude >> (exponent + 1)) & 0x0F
    return ((((exponent << 4) | mantissa) ^ sign) & 0xFF).astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with threaded_server(fake_config()) as (_, address):
        yield address


@pytest.fixture(scope="module")
def call_channels() -> tuple[np.ndarray, np.ndarray]:
    """Two speakers of an 8 kHz call: different loudness patterns, so each channel has its own transcript."""
    return tone(3.0, rate_hz=8000, seed=1), tone(3.0, rate_hz=8000, seed=2, amplitude=0.6)


def test_a_raw_mulaw_stereo_call_gives_one_result_per_channel(
    target: str, tmp_path: Path, call_channels: tuple[np.ndarray, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    """`transcribe call.ulaw --encoding mulaw --sample-rate 8000 --channels 2 --separate-channels --format jsonl`:
    one JSON line per channel, each equal to that channel sent alone as mono mu-law."""
    left, right = call_channels
    path = tmp_path / "call.ulaw"
    path.write_bytes(mulaw_encode(np.stack([left, right], axis=1).reshape(-1)))
    args = ["--target", target, "transcribe", str(path), "--encoding", "mulaw", "--sample-rate", "8000",
            "--channels", "2", "--separate-channels", "--format", "jsonl"]
    assert cli_main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with AsrClient(target) as client:
        alone = [client.transcribe(RawAudio(mulaw_encode(ch), "mulaw", 8000))[0].text for ch in (left, right)]
    assert [(d["audio"], d["channel_index"], d["text"]) for d in lines] == [
        (f"{path}:ch0", 0, alone[0]), (f"{path}:ch1", 1, alone[1])
    ]
    assert alone[0] != alone[1] and all(d["duration"] == 3.0 for d in lines)
    # Without --encoding the bytes are taken for a file the server cannot decode: a clear per-file error.
    assert cli_main(["--target", target, "transcribe", str(path)]) == 2
    assert f"asr-client: {path}: INVALID_ARGUMENT" in capsys.readouterr().err
    assert cli_main(["--target", target, "transcribe", str(path), "--encoding", "mulaw"]) == 2
    assert "--encoding needs --sample-rate" in capsys.readouterr().err


def test_stream_sends_a_raw_mulaw_stereo_file_as_it_is(
    tmp_path: Path, call_channels: tuple[np.ndarray, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    """`stream call.ulaw --encoding mulaw ... --separate-channels`: the config names the raw format and separate
    channels, the bytes arrive unchanged, not paced (the shared default), and the final result is printed."""
    left, right = call_channels
    data = mulaw_encode(np.stack([left, right], axis=1).reshape(-1))
    path = tmp_path / "call.ulaw"
    path.write_bytes(data)
    servicer = FakeLiveServicer()
    with fake_live_server(servicer) as address:
        started = time.monotonic()
        assert cli_main(["--target", address, "stream", str(path), "--encoding", "mulaw", "--sample-rate", "8000",
                         "--channels", "2", "--separate-channels", "--no-interim"]) == 0
        assert time.monotonic() - started < 2.5  # 3 s of audio
    config = servicer.configs[0].config
    assert config.audio_format == pb.AudioFormat(encoding=pb.AUDIO_ENCODING_MULAW, sample_rate_hz=8000,
                                                 channel_count=2)
    assert config.channel_mode == pb.CHANNEL_MODE_SEPARATE
    assert bytes(servicer.received) == data
    assert capsys.readouterr().out.strip() == f"[ch0    0.00-   3.00] final {len(data)} bytes"


def test_a_batch_with_a_bad_file_prints_the_good_ones_and_names_the_bad_one(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every file gets its own call: the good results are printed (and written), the bad file is named on stderr
    with the server's reason, and the exit status is 2."""
    other = exact_samples(1.0, seed=4)
    good, bad, good2 = tmp_path / "good.wav", tmp_path / "bad.wav", tmp_path / "good2.wav"
    good.write_bytes(WAV)
    bad.write_bytes(b"RIFF this is not audio at all" * 10)
    good2.write_bytes(wav_bytes(other))
    files = [str(good), str(bad), str(good2)]
    assert cli_main(["--target", target, "transcribe", *files]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"{good}\t[English]\t{expected_text(exact_samples(2.5, seed=11))}",
        f"{good2}\t[English]\t{expected_text(other)}",
    ]
    (error,) = captured.err.splitlines()
    assert error.startswith(f"asr-client: {bad}: INVALID_ARGUMENT: ")
    out_dir = tmp_path / "out"
    assert cli_main(["--target", target, "transcribe", *files, "--format", "srt", "--output-dir", str(out_dir)]) == 2
    assert sorted(p.name for p in out_dir.iterdir()) == ["good.srt", "good2.srt"]
    written = capsys.readouterr()
    assert written.out.splitlines() == [str(out_dir / "good.srt"), str(out_dir / "good2.srt")]
    assert f"asr-client: {bad}: INVALID_ARGUMENT" in written.err
    assert cli_main(["--target", target, "transcribe", str(good), str(good2), "--format", "jsonl"]) == 0
    assert [json.loads(line)["audio"] for line in capsys.readouterr().out.splitlines()] == [str(good), str(good2)]


def _run_cli(args: list[str], *, tty: bool) -> tuple[int, str, str]:
    """The CLI in a subprocess, its stderr a pseudo-terminal (tty) or a pipe; returns status, stdout, stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / p) for p in ("server", "clients/python",
                                                                                       "gen/python"))}
    command = [sys.executable, "-m", "asr_client.cli", *args]
    if not tty:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)
        return done.returncode, done.stdout, done.stderr
    leader, follower = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, and tqdm draws nothing in 0 columns: make it a usual 80x24.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    err = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    out = process.stdout.read().decode() if process.stdout else ""
    status = process.wait(timeout=60)
    os.close(leader)
    return status, out, err.decode(errors="replace")


def test_the_progress_bar_shows_on_a_terminal_only(target: str, tmp_path: Path) -> None:
    """On a terminal stderr shows a tqdm bar of uploaded bytes and finished files; in a pipe nothing but errors."""
    files = []
    for i in range(3):
        path = tmp_path / f"f{i}.wav"
        path.write_bytes(wav_bytes(exact_samples(1.0, seed=30 + i)))
        files.append(str(path))
    status, out, err = _run_cli(["--target", target, "transcribe", *files], tty=True)
    assert status == 0 and len(out.splitlines()) == 3
    assert "3/3 files" in err and "uploading" in err, err
    status, out, err = _run_cli(["--target", target, "transcribe", *files], tty=False)
    assert status == 0 and len(out.splitlines()) == 3 and err == ""
