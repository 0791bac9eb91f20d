"""AsrService through Ray Serve's gRPC proxy (edge/ray_serve.py) on a local two-node Ray cluster, CPU only.

One cluster for the module (starting Ray costs ~15 s): the tiny checkpoint's application checks that every RPC
answers what the standalone server answers; the fake engine's carries the load, the kill and the autoscaling.
Skipped when Ray is not installed (`pip install .[ray]`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr_server.config import parse_serve_config
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.conftest import REPO_ROOT
from tests.helpers import running_server
from tests.speech import espeak_available, synthesize_sentences
from tests.streaming_helpers import LINEAR16_16K, pcm16, stream_config

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]' (docs/scale-out.md)")
serve = pytest.importorskip("ray.serve")
ray_serve = pytest.importorskip("asr_server.edge.ray_serve")
from ray.cluster_utils import Cluster  # noqa: E402
from ray.serve.config import gRPCOptions  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (make system-deps)"),
    pytest.mark.timeout(600),
]

SENTENCES = ["the quick brown fox jumps over the lazy dog", "a second sentence follows the first one"]
MAX_NEW_TOKENS = 8
FAKE_ARGS = ("--engine", "fake", "--no-warmup", "--max-batch-wait-ms", "5")


def _application(name: str) -> tuple[tuple[str, str], ...]:
    return (("application", name),)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Two Ray nodes on this machine (a head and a worker), each with few logical CPUs, and Serve's gRPC proxy."""
    # Replicas import asr_server from this checkout, not from wherever the package was installed.
    paths = [str(REPO_ROOT / p) for p in ("server", "clients/python", "gen/python")] + [str(REPO_ROOT)]
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([old_path] if old_path else []))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    serve.start(
        http_options={"host": "127.0.0.1", "port": _free_port()},
        grpc_options=gRPCOptions(port=_free_port(), grpc_servicer_functions=list(ray_serve.GRPC_SERVICER_FUNCTIONS))
    )
    try:
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _grpc_port() -> int:
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    port: int = ray.get(client._controller.get_grpc_config.remote()).port
    return port


def _deploy(name: str, server_args: tuple[str, ...], options: Any) -> None:
    serve.run(ray_serve.build_app(server_args, options), name=name, route_prefix=f"/{name}")


@pytest.fixture
async def proxy(cluster: Cluster) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{_grpc_port()}", options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    )
    try:
        yield channel
    finally:
        await channel.close()


def _replica_pids(app: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:{ray_serve.DEPLOYMENT_NAME}"),
                                  ("state", "=", "ALIVE")])
    return sorted(int(actor.pid) for actor in actors)


# ---- step 1 and 2: every RPC answers what the standalone server answers ----


async def test_every_rpc_through_the_proxy_equals_the_standalone_server(
    proxy: grpc.aio.Channel, tiny_checkpoints: Any
) -> None:
    args = ("--model", str(tiny_checkpoints.asr_hf), "--device", "cpu", "--dtype", "float32", "--engine",
            "transformers", "--no-warmup", "--max-batch-wait-ms", "2")
    _deploy("tiny", args, ray_serve.DeploymentOptions(num_replicas=2, num_cpus=0.5))
    metadata = _application("tiny")
    audio, _ = synthesize_sentences(SENTENCES, silence_s=1.0)
    data = pcm16(audio)
    recognition = pb.RecognitionConfig(audio_format=LINEAR16_16K, max_new_tokens=MAX_NEW_TOKENS)
    unary_request = pb.TranscribeRequest(config=recognition, audio=data)

    def stream_requests() -> Iterator[pb.TranscribeStreamRequest]:
        yield pb.TranscribeStreamRequest(config=recognition)
        for offset in range(0, len(data), 32_000):
            yield pb.TranscribeStreamRequest(audio=data[offset : offset + 32_000])

    live_config = stream_config(max_new_tokens=MAX_NEW_TOKENS)

    async def answers(stub: pb_grpc.AsrServiceStub, md: tuple[tuple[str, str], ...]) -> dict[str, Any]:
        unary = await stub.Transcribe(unary_request, metadata=md)
        streamed = await stub.TranscribeStream(stream_requests(), metadata=md)
        info = await stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=md)
        live = []
        for _ in range(2):  # twice: with two replicas, the answers must not depend on which one serves
            finals = [f for f in await _collect(stub, _live(live_config, data), md) if f.is_final]
            live.append([(f.text, f.start_ms, f.end_ms, f.utterance_index) for f in finals])
        try:
            await stub.Transcribe(pb.TranscribeRequest(audio=b"not audio"), metadata=md)
        except grpc.aio.AioRpcError as exc:
            error = (exc.code(), exc.details())
        return {
            "unary": [(t.text, t.language) for t in unary.transcripts],
            "stream": [(t.text, t.language) for t in streamed.transcripts],
            "info": info,
            "live": live,
            "error": error,
        }

    config = parse_serve_config([*args, "--host", "127.0.0.1", "--port", "0"], {})
    async with running_server(config) as (_, channel):
        expected = await answers(pb_grpc.AsrServiceStub(channel), ())
    got = await answers(pb_grpc.AsrServiceStub(proxy), metadata)
    assert got == expected
    assert len(got["live"][0]) == len(SENTENCES)
    assert got["error"][0] == grpc.StatusCode.INVALID_ARGUMENT
    # Health through the proxy: the replica's own grpc.health.v1 answer.
    health = await health_pb2_grpc.HealthStub(proxy).Check(health_pb2.HealthCheckRequest(), metadata=metadata)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    serve.delete("tiny")


async def _live(config: pb.StreamingRecognizeRequest, data: bytes) -> AsyncIterator[pb.StreamingRecognizeRequest]:
    yield config
    for offset in range(0, len(data), 6400):  # 200 ms pieces
        yield pb.StreamingRecognizeRequest(audio=data[offset : offset + 6400])


async def _collect(stub: pb_grpc.AsrServiceStub, requests: AsyncIterator[Any], md: Any) -> list[pb.StreamingResult]:
    return [r.result async for r in stub.StreamingRecognize(requests, metadata=md) if r.HasField("result")]

