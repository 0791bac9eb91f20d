"""deploy/ray/serve.yaml and its reader (edge/ray_serve.py); Ray itself is not needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from asr_server.config import ConfigError
from asr_server.edge.ray_autoscale import LiveLoadPolicy
from asr_server.edge.ray_serve import GRPC_SERVICER_FUNCTIONS, RayServeFile, read_serve_file

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_file_reads_and_asks_one_gpu_per_replica() -> None:
    serve_file = read_serve_file(REPO_ROOT / "deploy/ray/serve.yaml", {})
    assert isinstance(serve_file, RayServeFile)
    assert serve_file.deployment.num_gpus == 1
    assert serve_file.deployment.autoscaling is not None
    assert serve_file.deployment.autoscaling["min_replicas"] <= serve_file.deployment.autoscaling["max_replicas"]
    policy = serve_file.deployment.autoscaling["policy"]
    module, name = policy["policy_function"].split(":")
    assert (module, name) == ("asr_server.edge.ray_autoscale", "LiveLoadPolicy")
    LiveLoadPolicy(**policy["policy_kwargs"])  # the kwargs the controller will construct it with
    assert "--model" in serve_file.server_args
    assert serve_file.ray_address is None


def test_a_bad_server_flag_fails_when_the_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("server_args: [--engine, nonsense]\n")
    with pytest.raises(ConfigError, match="--engine"):
        read_serve_file(path, {})


@pytest.mark.parametrize(
    ("text", "problem"),
    [("grpc_prot: 9000\n", "unknown keys"), ("deployment: {num_gpu: 1}\n", "deployment"), ("- a\n", "mapping")],
)
def test_a_misspelt_file_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        read_serve_file(path, {})


def test_the_proxy_registers_the_asr_service_and_health() -> None:
    assert any("add_AsrServiceServicer_to_server" in name for name in GRPC_SERVICER_FUNCTIONS)
    assert any("add_HealthServicer_to_server" in name for name in GRPC_SERVICER_FUNCTIONS)
