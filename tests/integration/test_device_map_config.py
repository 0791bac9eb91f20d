"""`--device-map` in the config and what engine core it resolves to (engine/factory.py, edge/server.py).

The factory: the continuous engine (the default) only when no device_map is given, since its paged decoder wants
every layer on one device; with one, the generate engine (padded batches), with a warning; `--engine transformers`
is the generate engine either way. (How the config reads the flag, and that `--devices` with several devices and a
device_map are refused together: tests/unit/test_config_device_map.py.)

The cores are built from the tiny original-layout checkpoint, which takes a device_map without `accelerate` (the -hf
layout needs it, a dependency; see tests/integration/test_device_map.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pytest

from asr_server.config import Config, parse_serve_config
from asr_server.edge.server import AsrServer
from asr_server.engine.continuous.core import ContinuousEngine
from asr_server.engine.core import EngineCore
from asr_server.engine.generate_core import GenerateEngine
from asr_server.engine.replicas import ReplicatedRunner
from asr_server.engine.runner import EngineRunner
from asr_server.models.tiny_checkpoint import TinyCheckpoints

FALLBACK_WARNING = "--device-map given: using the generate engine"


def _config(model: str, *flags: str) -> Config:
    return parse_serve_config(
        ["--model", model, "--dtype", "float32", "--kv-cache-tokens", "4096", "--port", "0", *flags], {}
    )


@contextlib.contextmanager
def _cores(server: AsrServer) -> Iterator[list[EngineCore]]:
    """Each replica's core, built by its runner's factory here instead of on an engine thread, closed after."""
    runners = server.engine.runners if isinstance(server.engine, ReplicatedRunner) else [server.engine]
    cores = [runner._worker._core_factory() for runner in runners]
    try:
        yield cores
    finally:
        for core in cores:
            core.close()


@pytest.mark.parametrize(
    ("flags", "core_type", "warned"),
    [
        ([], ContinuousEngine, False),
        (["--device-map", "auto"], GenerateEngine, True),
        (["--device-map", "auto", "--engine", "continuous"], GenerateEngine, True),
        (["--device-map", "cpu", "--engine", "continuous"], GenerateEngine, True),
        (["--device-map", "auto", "--devices", "cpu"], GenerateEngine, True),
        (["--device-map", "auto", "--engine", "transformers"], GenerateEngine, False),
        (["--engine", "transformers"], GenerateEngine, False),
    ],
)
def test_a_device_map_resolves_to_the_generate_engine(
    tiny_checkpoints: TinyCheckpoints,
    caplog: pytest.LogCaptureFixture,
    flags: list[str],
    core_type: type[EngineCore],
    warned: bool,
) -> None:
    caplog.set_level(logging.WARNING, logger="asr_server")
    server = AsrServer(_config(str(tiny_checkpoints.asr_original), *flags))
    assert isinstance(server.engine, EngineRunner)
    with _cores(server) as (core,):
        assert type(core) is core_type
        assert str(core._loaded.device) == "cpu"  # type: ignore[attr-defined]
    assert any(FALLBACK_WARNING in r.getMessage() for r in caplog.records) == warned
