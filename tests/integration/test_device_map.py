"""`--device-map` through the real gRPC server (tiny checkpoint, CPU): the server starts, runs the generate engine
(the continuous engine, the default, wants every layer on one device and is not used with a device_map) and
transcribes a clip exactly as the reference path does.

Reference: processor.apply_transcription_request -> model.generate -> processor.decode(parsed) on the model loaded
without a device_map. The -hf and original tiny checkpoints hold the same weights, so one reference serves both.

On a CPU-only machine, transformers takes the string forms "cpu" and "auto" (and "balanced", "sequential"); the
flag is a string, so a dict such as {"": "cpu"} cannot be given. For the -hf layout transformers needs `accelerate`
(a dependency) for any device_map; the original layout is loaded by hand onto the one device the map names and does not.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from asr_server.config import parse_serve_config
from asr_server.edge.server import AsrServer
from asr_server.engine.generate_core import GenerateEngine
from asr_server.engine.runner import EngineRunner
from asr_server.models.loading import LoadedAsrModel, load_asr_model
from asr_server.models.tiny_checkpoint import TinyCheckpoints
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc

# The parity module's clip, reference path and token cap: the same reference, not a copy of it.
from tests.integration.test_parity_tiny import FLOAT32_16K, MAX_NEW_TOKENS, speechlike
from tests.integration.test_parity_tiny import reference as reference_with_options


@pytest.fixture(scope="module")
def tiny_asr(tiny_checkpoints: TinyCheckpoints) -> LoadedAsrModel:
    return load_asr_model(str(tiny_checkpoints.asr_hf), dtype="float32", device="cpu")


def reference(loaded: LoadedAsrModel, audio: np.ndarray) -> dict[str, Any]:
    return reference_with_options(loaded, audio, None, "")


@pytest.mark.parametrize(
    ("layout", "device_map"),
    [
        ("original", "auto"),
        ("original", "cpu"),
        ("hf", "auto"),
        ("hf", "cpu"),
    ],
)
async def test_a_server_with_a_device_map_runs_the_generate_engine_and_matches_the_reference(
    tiny_checkpoints: TinyCheckpoints,
    tiny_asr: LoadedAsrModel,
    caplog: pytest.LogCaptureFixture,
    layout: str,
    device_map: str,
) -> None:
    model_dir: Path = tiny_checkpoints.asr_hf if layout == "hf" else tiny_checkpoints.asr_original
    # As `asr-server serve` reads it: the default engine (continuous), dtype auto (float32 on CPU), warm-up on.
    config = parse_serve_config(
        ["--model", str(model_dir), "--device-map", device_map, "--host", "127.0.0.1", "--port", "0"], {}
    )
    assert config.engine.kind == "continuous" and config.model.device_map == device_map
    audio = speechlike(2.3, seed=5)
    expected = reference(tiny_asr, audio)
    caplog.set_level(logging.WARNING, logger="asr_server")
    server = AsrServer(config)
    try:
        await server.start()
        assert isinstance(server.engine, EngineRunner)
        core = server.engine.core
        assert type(core) is GenerateEngine, type(core)
        assert str(core._loaded.device) == "cpu" and str(core._loaded.dtype) == "torch.float32"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.AsrServiceStub(channel)
            info = await stub.GetServerInfo(pb.GetServerInfoRequest())
            response = await stub.Transcribe(
                pb.TranscribeRequest(
                    config=pb.RecognitionConfig(audio_format=FLOAT32_16K, max_new_tokens=MAX_NEW_TOKENS),
                    audio=audio.astype("<f4").tobytes(),
                )
            )
    finally:
        # Also after a failed start: the port is open by then (tests.helpers.running_server would leave it so).
        await server.stop(grace_s=1.0)
    assert info.model_id == str(model_dir)
    (transcript,) = response.transcripts
    assert transcript.text == expected["transcription"]
    assert transcript.language == (expected["language"] or "")
    assert any("--device-map given: using the generate engine" in r.getMessage() for r in caplog.records)
