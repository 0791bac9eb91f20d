"""gRPC's own retries (the clients' service-config retryPolicy): a call failing UNAVAILABLE or RESOURCE_EXHAUSTED is
sent again with backoff, a bounded number of times, unless the server's `grpc-retry-pushback-ms: -1` says retrying
cannot help; `retries=False` turns them off."""

from __future__ import annotations

import grpc
import pytest

from asr_client import AsrClient, AsyncAsrClient, ResourceExhaustedError, UnavailableError
from asr_client._core import RETRY_POLICY
from tests.clients.servers import FlakyServicer, fake_live_server, threaded_server
from tests.clients.test_python_client import LONG_WAV, QUEUE_OF_ONE, WAV

MAX_ATTEMPTS = RETRY_POLICY["maxAttempts"]


def test_a_call_failing_unavailable_once_is_retried_and_succeeds() -> None:
    """A replica restarting answers UNAVAILABLE; the retry policy sends the call again and the caller sees only
    the answer. Transcribe and TranscribeStream (an upload under gRPC's retry buffer) alike."""
    servicer = FlakyServicer(failures=1)
    with fake_live_server(servicer) as address, AsrClient(address, stream_threshold_bytes=1000) as client:
        (streamed,) = client.transcribe(WAV)  # over the threshold: TranscribeStream
        assert streamed.text == "attempt 2"
    with fake_live_server(FlakyServicer(failures=1)) as address, AsrClient(address) as client:
        assert client.transcribe(WAV)[0].text == "attempt 2"
    assert servicer.attempts["TranscribeStream"] == 2


def test_retries_are_bounded_and_can_be_turned_off() -> None:
    """At most maxAttempts calls, then the last error; with retries=False exactly one."""
    servicer = FlakyServicer(failures=100)
    with fake_live_server(servicer) as address:
        with AsrClient(address) as client, pytest.raises(UnavailableError, match="fails on purpose"):
            client.transcribe(WAV)
        assert servicer.attempts["Transcribe"] == MAX_ATTEMPTS
        with AsrClient(address, retries=False) as client, pytest.raises(UnavailableError):
            client.transcribe(WAV)
        assert servicer.attempts["Transcribe"] == MAX_ATTEMPTS + 1


def test_resource_exhausted_is_retried_unless_the_server_pushes_back() -> None:
    """RESOURCE_EXHAUSTED (a full queue) is retried; with `grpc-retry-pushback-ms: -1` it is not (gRFC A6)."""
    full = FlakyServicer(failures=1, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    with fake_live_server(full) as address, AsrClient(address) as client:
        assert client.transcribe(WAV)[0].text == "attempt 2"
    final = FlakyServicer(failures=1, code=grpc.StatusCode.RESOURCE_EXHAUSTED, pushback_ms="-1")
    with fake_live_server(final) as address, AsrClient(address) as client:
        with pytest.raises(ResourceExhaustedError):
            client.transcribe(WAV)
    assert final.attempts["Transcribe"] == 1


def test_the_real_server_stops_retries_of_audio_over_its_limits_and_paces_full_queue_retries() -> None:
    """The server's RESOURCE_EXHAUSTED for audio over a limit carries pushback -1 (not retried); a full queue's
    carries its RetryInfo delay, after which the retry finds room: a batch of 4 on a queue of one all succeed."""
    with threaded_server(QUEUE_OF_ONE) as (_, address), AsrClient(address, timeout_s=30) as client:
        with pytest.raises(ResourceExhaustedError, match="max_audio_duration_s=3"):
            client.transcribe(LONG_WAV)
        results = client.transcribe([WAV] * 3)
        assert len(results) == 3 and all(r.text for r in results)


async def test_async_client_retries_too() -> None:
    """The asyncio client's channel carries the same policy."""
    with fake_live_server(FlakyServicer(failures=2)) as address:
        async with AsyncAsrClient(address) as client:
            assert (await client.transcribe(WAV))[0].text == "attempt 3"
