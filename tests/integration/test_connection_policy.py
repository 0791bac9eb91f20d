"""The HTTP/2 connection policy with small values: idle connections and silent TCP connections are closed, an old
connection gets GOAWAY while its open call finishes within the grace, the per-connection stream cap holds extra
calls back, and a client pinging every 5 s is not struck off (while one pinging every second is)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr_server.config import Config, ConnectionConfig, parse_serve_config
from asr_server.edge.server import AsrServer, connection_options
from asr_server.engine.fake import FakeEngine
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, running_server, tone, wav_bytes

Connectivity = grpc.ChannelConnectivity


def with_connection(config: Config, **policy: Any) -> Config:
    return dataclasses.replace(config, connection=dataclasses.replace(config.connection, **policy))


def channel_to(server: AsrServer, **options: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=list(options.items()))


async def check(channel: grpc.aio.Channel) -> None:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def state_leaves_ready(channel: grpc.aio.Channel, within_s: float) -> float | None:
    """Seconds until the channel's connection is closed under it (READY -> IDLE/...), or None within `within_s`."""
    start = time.monotonic()
    assert channel.get_state() == Connectivity.READY
    try:
        await asyncio.wait_for(channel.wait_for_state_change(Connectivity.READY), within_s)
    except TimeoutError:
        return None
    return time.monotonic() - start


def wav_request(seed: int) -> pb.TranscribeRequest:
    return pb.TranscribeRequest(audio=wav_bytes(tone(0.5, seed=seed)))


def test_defaults_are_the_documented_policy() -> None:
    policy = parse_serve_config([], {}).connection
    assert policy == ConnectionConfig()
    options = dict(connection_options(policy))
    assert options["grpc.max_concurrent_streams"] == 1024
    assert options["grpc.max_connection_idle_ms"] == 300_000
    assert options["grpc.max_connection_age_ms"] == 1_800_000
    assert options["grpc.max_connection_age_grace_ms"] == 600_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_ping_interval_without_data_ms"] < 5000
    env = {"ASR_MAX_CONNECTION_AGE_MS": "0", "ASR_MAX_CONCURRENT_STREAMS": "8"}
    custom = parse_serve_config(["--max-connection-idle-ms", "0"], env).connection
    assert custom.max_concurrent_streams == 8
    custom_options = dict(connection_options(custom))
    # 0 means never: the options are left out (gRPC's default is no limit).
    assert "grpc.max_connection_idle_ms" not in custom_options and "grpc.max_connection_age_ms" not in custom_options


async def test_an_idle_connection_is_closed_after_the_idle_time() -> None:
    config = with_connection(fake_config(), max_connection_idle_ms=600)
    async with running_server(config) as (server, _):
        channel = channel_to(server)
        await check(channel)
        closed_after_s = await state_leaves_ready(channel, within_s=5.0)
        assert closed_after_s is not None and closed_after_s >= 0.4
        # A closed idle connection costs the client nothing: the next call reconnects.
        await check(channel)
        await channel.close()


async def test_a_busy_connection_is_not_idle() -> None:
    config = with_connection(fake_config(fake_batch_delay_ms=1500), max_connection_idle_ms=500)
    async with running_server(config) as (server, _):
        channel = channel_to(server)
        await check(channel)
        call = pb_grpc.AsrServiceStub(channel).Transcribe(wav_request(1), timeout=10)
        # The call outlives the idle time three times over on the same connection.
        response = await call
        assert response.transcripts[0].text
        await channel.close()


async def test_a_silent_tcp_connection_is_closed_after_the_handshake_timeout() -> None:
    config = with_connection(fake_config(), handshake_timeout_ms=500)
    async with running_server(config) as (server, _):
        start = time.monotonic()

        def wait_for_close() -> float:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
                while raw.recv(4096):  # the server's SETTINGS may come first; then end of stream
                    pass
            return time.monotonic() - start

        closed_after_s = await asyncio.to_thread(wait_for_close)
        assert 0.4 <= closed_after_s < 5.0


async def test_an_old_connection_gets_goaway_and_its_open_call_finishes_within_the_grace() -> None:
    config = with_connection(
        fake_config(fake_batch_delay_ms=1200), max_connection_age_ms=500, max_connection_age_grace_ms=3000
    )
    async with running_server(config) as (server, _):
        channel = channel_to(server)
        await check(channel)
        started = time.monotonic()
        call = pb_grpc.AsrServiceStub(channel).Transcribe(wav_request(2), timeout=10)
        goaway_after_s = await state_leaves_ready(channel, within_s=5.0)
        assert goaway_after_s is not None and goaway_after_s < 1.2  # before the call is done
        response = await call
        assert response.transcripts[0].text
        assert time.monotonic() - started >= 1.2
        await channel.close()


async def test_a_call_longer_than_age_plus_grace_is_cut() -> None:
    config = with_connection(
        fake_config(fake_batch_delay_ms=1500), max_connection_age_ms=300, max_connection_age_grace_ms=500
    )
    async with running_server(config) as (server, _):
        channel = channel_to(server)
        await check(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.AsrServiceStub(channel).Transcribe(wav_request(3), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        await channel.close()


# A burst past the cap: gRPC's C-core server counts a finished stream until it is deallocated, a moment after the
# client saw its trailers, so a client that starts a queued call at once can get REFUSED_STREAM (UNAVAILABLE, never
# processed). The retry policy docs/operations.md recommends for mesh clients absorbs it.
RETRY_UNAVAILABLE = json.dumps({
    "methodConfig": [{
        "name": [{"service": "qwenasr.v1.AsrService"}],
        "retryPolicy": {
            "maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
})


@pytest.mark.parametrize("cap", [2, 8])
async def test_the_stream_cap_holds_extra_calls_back_on_one_connection(cap: int) -> None:
    cores: list[FakeEngine] = []

    def factory() -> FakeEngine:
        cores.append(FakeEngine(max_batch_size=16, batch_delay_ms=300))
        return cores[-1]

    config = with_connection(fake_config(max_batch_wait_ms=100), max_concurrent_streams=cap)
    async with running_server(config, core_factory=factory) as (server, _):
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}", options=[("grpc.service_config", RETRY_UNAVAILABLE)]
        )
        await check(channel)
        stub = pb_grpc.AsrServiceStub(channel)
        started = time.monotonic()
        calls = [asyncio.ensure_future(stub.Transcribe(wav_request(10 + i), timeout=10)) for i in range(6)]
        most_in_flight = 0
        while not all(call.done() for call in calls):
            most_in_flight = max(most_in_flight, server.in_flight_calls)
            await asyncio.sleep(0.01)
        took_s = time.monotonic() - started
        assert all(call.result().transcripts[0].text for call in calls)
        await channel.close()
    biggest_batch = max(len(batch) for batch in cores[0].batches)
    if cap == 2:
        # The other four waited for a free stream: never more than two at the server, three rounds of 300 ms.
        assert most_in_flight == 2 and biggest_batch <= 2
        assert took_s >= 0.9
    else:
        # The control: with room for all, the six were in flight at once and batched together.
        assert most_in_flight == 6 and biggest_batch == 6


@pytest.mark.slow
async def test_a_client_pinging_every_5_s_on_an_idle_connection_is_not_disconnected() -> None:
    async with running_server(fake_config()) as (server, _):
        pinger = channel_to(
            server,
            **{
                "grpc.keepalive_time_ms": 5000,
                "grpc.keepalive_permit_without_calls": 1,
                # Ping on however long the connection goes without data (gRPC's default stops after two).
                "grpc.http2.max_pings_without_data": 0,
            },
        )
        await check(pinger)
        # The control: pinging every second breaks the policy and gets GOAWAY too_many_pings.
        abuser = channel_to(
            server,
            **{
                "grpc.keepalive_time_ms": 1000,
                "grpc.keepalive_permit_without_calls": 1,
                "grpc.http2.max_pings_without_data": 0,
            },
        )
        await check(abuser)
        abuser_cut_after_s, pinger_cut_after_s = await asyncio.gather(
            state_leaves_ready(abuser, within_s=12.0), state_leaves_ready(pinger, within_s=12.0)
        )
        assert abuser_cut_after_s is not None
        assert pinger_cut_after_s is None
        await check(pinger)
        await pinger.close()
        await abuser.close()
