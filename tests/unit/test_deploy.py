"""deploy/: the Kubernetes manifests validate against the Kubernetes API schemas (kubernetes-validate, offline, strict:
unknown fields refused) and agree with the server (probe service names, ports, grace, real ASR_* variables); the
Dockerfile has a CUDA base, a non-root user and a health check the client CLI understands."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from asr_client.cli import _parser as client_parser
from asr_server.config import add_serve_arguments, parse_serve_config
from qwenasr.v1 import asr_pb2

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
ASR_SERVICE = asr_pb2.DESCRIPTOR.services_by_name["AsrService"].full_name
# The oldest Kubernetes the manifests promise (gRPC probes are GA since 1.27) and the newest the tool bundles.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def of_kind(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in documents() if doc["kind"] == kind]
    return found


def container() -> dict[str, Any]:
    (server,) = of_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    return server


def env_values() -> dict[str, str]:
    return {item["name"]: item["value"] for item in container()["env"] if "value" in item}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    assert {doc["kind"] for doc in documents()} == {"Deployment", "Service", "PodDisruptionBudget"}
    for doc in documents():
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_refuses_a_misspelt_field() -> None:
    deployment = of_kind("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["sevice"] = ASR_SERVICE
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_probes_use_the_health_services_the_server_reports() -> None:
    server = container()
    startup, liveness, readiness = (server[name] for name in ("startupProbe", "livenessProbe", "readinessProbe"))
    port = int(env_values()["ASR_PORT"])
    for probe in (startup, liveness, readiness):
        assert probe["grpc"]["port"] == port
    # "" and AsrService are NOT_SERVING until the model is loaded: the startup probe waits that out (10 min at least)
    # before liveness, which would otherwise kill a loading pod, runs at all.
    assert startup["grpc"]["service"] == ""
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert liveness["grpc"]["service"] == ""
    assert readiness["grpc"]["service"] == ASR_SERVICE


def test_the_pod_outlives_its_drain_and_asks_for_one_gpu() -> None:
    pod = of_kind("Deployment")["spec"]["template"]["spec"]
    server = container()
    config = parse_serve_config([], env_values())
    pre_stop_s = int(server["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + config.server.grace_period_s + 10
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert server["ports"][0]["containerPort"] == config.server.port


def test_the_deployment_sets_only_real_asr_variables() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    known = set(re.findall(r"\bASR_[A-Z0-9_]+", parser.format_help().replace("\n", " ")))
    named = {item["name"] for item in container()["env"] if item["name"].startswith("ASR_")}
    assert named <= known, named - known
    assert parse_serve_config([], env_values()).connection.max_connection_age_ms == 1_800_000


def test_service_and_budget_select_the_pods() -> None:
    labels = of_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    service, budget = of_kind("Service"), of_kind("PodDisruptionBudget")
    assert service["spec"]["selector"].items() <= labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Headless, for client-side round_robin over the pods (docs/operations.md).
    assert service["spec"]["clusterIP"] == "None"
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == container()["ports"][0]["name"] and port["appProtocol"] == "grpc"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_image_is_cuda_based_non_root_and_health_checked() -> None:
    instructions = dockerfile_instructions()
    args = {value.split("=", 1)[0]: value.split("=", 1)[1] for kind, value in instructions if kind == "ARG" and "=" in value}
    bases = [value.split()[0] for kind, value in instructions if kind == "FROM"]
    assert all(base == "${CUDA_IMAGE}" for base in bases) and args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert "runtime" in args["CUDA_IMAGE"]
    assert "MODEL_ID" in args  # pre-fetch at build time when given
    (user,) = [value for kind, value in instructions if kind == "USER"]
    assert user.split(":")[0] not in ("root", "0")
    (entrypoint,) = [value for kind, value in instructions if kind == "ENTRYPOINT"]
    assert entrypoint == '["asr-server", "serve"]'
    (healthcheck,) = [value for kind, value in instructions if kind == "HEALTHCHECK"]
    command = shlex.split(healthcheck.split(" CMD ", 1)[1].split("||")[0])
    assert command[0] == "asr-client" and command[-1] == "health"
    parsed = client_parser().parse_args([arg.replace("${ASR_PORT}", "50051") for arg in command[1:]])
    assert parsed.command == "health" and parsed.target == "127.0.0.1:50051"
    (expose,) = [value for kind, value in instructions if kind == "EXPOSE"]
    assert expose == "50051"
