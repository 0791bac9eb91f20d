"""Start-up failures are one clear line with an exit code, not a traceback (real `asr-server` processes); a forced
aligner whose model cannot load is not restarted and timestamp requests get FAILED_PRECONDITION at once."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr_server.aligner.managed import WORD_TIMESTAMPS_HEALTH_SERVICE, SidecarAligner
from asr_server.aligner.supervisor import EXIT_ALIGNER_MODEL
from asr_server.config import AlignerConfig
from asr_server.edge.server import EXIT_MODEL, EXIT_PORT
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, wav_bytes


def _serve(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asr_server.cli", "serve", "--host", "127.0.0.1", "--no-warmup", *args],
        capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("asr-server: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_a_port_in_use_is_one_line_and_exit_code_3() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = _serve("--engine", "fake", "--port", str(port))
    assert done.returncode == EXIT_PORT == 3, done.stderr
    line = _one_error_line(done.stderr)
    assert f"port {port} is in use; " in line, line
    assert "add_port" not in done.stderr  # gRPC's own bind error is not reached


@pytest.mark.parametrize("kind", ["missing", "not a checkpoint"])
def test_a_wrong_model_is_one_line_and_exit_code_4(tmp_path: Path, kind: str) -> None:
    model = tmp_path / "missing" if kind == "missing" else tmp_path
    done = _serve("--engine", "transformers", "--device", "cpu", "--port", "0", "--model", str(model))
    assert done.returncode == EXIT_MODEL == 4, done.stderr
    line = _one_error_line(done.stderr)
    assert f"cannot load --model '{model}'" in line, line
    assert ("does not exist" if kind == "missing" else "not a model checkpoint") in line, line
    assert "serving" not in done.stdout


def test_the_aligner_subcommand_with_a_wrong_model_exits_4_with_one_line(tmp_path: Path) -> None:
    failure = tmp_path / "failure.txt"
    done = subprocess.run(
        [sys.executable, "-m", "asr_server.cli", "aligner", "--model", str(tmp_path / "nope"), "--listen",
         f"unix://{tmp_path}/a.sock", "--device", "cpu", "--failure-file", str(failure)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == EXIT_ALIGNER_MODEL, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "asr-server aligner: error: cannot load --model" in done.stderr
    assert "does not exist" in failure.read_text()


@pytest.mark.slow
async def test_an_aligner_that_cannot_load_its_model_answers_failed_precondition_at_once(tmp_path: Path) -> None:
    bad_model = str(tmp_path / "no-such-aligner")
    config = dataclasses.replace(
        fake_config(), aligner=AlignerConfig(model=bad_model, mode="spawn", device="cpu", timeout_s=120)
    )
    aligner = SidecarAligner(config.aligner, ready_wait_s=120, poll_interval_s=0.1)
    assert aligner.supervisor is not None
    request = pb.TranscribeRequest(
        audio=wav_bytes(tone(1.0, seed=1)), config=pb.RecognitionConfig(return_word_timestamps=True)
    )
    async with running_server(config, aligner=aligner) as (_, channel):
        stub = pb_grpc.AsrServiceStub(channel)
        # Sent while the sidecar is still starting: answered when it fails, not at the end of a 120 s wait.
        early = asyncio.ensure_future(stub.Transcribe(request))
        await asyncio.wait_for(aligner.supervisor.failed.wait(), 90)
        failed_at = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as early_error:
            await asyncio.wait_for(early, 10)
        assert time.monotonic() - failed_at < 5
        assert early_error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Transcribe(request)
        assert time.monotonic() - started < 2
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert bad_model in (error.value.details() or "") and "does not exist" in (error.value.details() or "")
        assert aligner.supervisor.starts == 1  # not restarted
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=WORD_TIMESTAMPS_HEALTH_SERVICE)
        )
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # Transcription without timestamps is unaffected.
        plain = await stub.Transcribe(pb.TranscribeRequest(audio=wav_bytes(tone(1.0, seed=2))))
        assert plain.transcripts[0].text
