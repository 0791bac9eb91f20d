"""The edge's status table and status details, the tolerant request parser, and the bounded echo of input."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from asr_server.edge import rpc
from asr_server.errors import (
    AsrError,
    FailedPrecondition,
    InvalidInput,
    LimitExceeded,
    Unavailable,
    excerpt,
)
from asr_server.languages import resolve_language
from asr_server.streaming.session import IdleTimeout
from qwenasr.v1 import asr_pb2 as pb


def details_of(status: grpc.Status) -> status_pb2.Status:
    (value,) = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    return status_pb2.Status.FromString(value)


def pushback_of(status: grpc.Status) -> str | None:
    values = [v for k, v in status.trailing_metadata if k == "grpc-retry-pushback-ms"]
    return values[0] if values else None


def retry_delay_s(status: grpc.Status) -> float | None:
    for detail in details_of(status).details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (LimitExceeded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (IdleTimeout("x"), grpc.StatusCode.OUT_OF_RANGE),
        (AsrError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_domain_error_has_its_code(error: AsrError, code: grpc.StatusCode) -> None:
    assert rpc.status_for(error) == code


def test_retry_info_only_where_retrying_can_succeed() -> None:
    assert LimitExceeded("audio too long").retry_after_s is None
    assert LimitExceeded("queue full", retryable=True).retry_after_s == 1.0
    assert LimitExceeded("queue full", retryable=True, retry_after_s=0.25).retry_after_s == 0.25
    assert Unavailable("restarting").retry_after_s == 1.0
    assert InvalidInput("bad").retry_after_s is None

    full = rpc.grpc_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", retry_after_s=0.25)
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED and full.details == "queue full"
    assert details_of(full).code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert details_of(full).message == "queue full"
    assert retry_delay_s(full) == 0.25
    assert retry_delay_s(rpc.grpc_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "too long")) is None


def test_retry_pushback_tells_grpc_retries_the_same() -> None:
    """gRPC's built-in retries (gRFC A6) read grpc-retry-pushback-ms, not RetryInfo: the delay where retrying
    helps, -1 (do not retry) for a RESOURCE_EXHAUSTED that cannot be cured, nothing for the other codes."""
    assert pushback_of(rpc.grpc_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", retry_after_s=0.25)) == "250"
    assert pushback_of(rpc.grpc_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "too long")) == "-1"
    assert pushback_of(rpc.grpc_status(grpc.StatusCode.UNAVAILABLE, "restarting", retry_after_s=1.0)) == "1000"
    assert pushback_of(rpc.grpc_status(grpc.StatusCode.INVALID_ARGUMENT, "bad")) is None


def test_a_huge_message_is_cut_to_what_a_client_can_receive() -> None:
    status = rpc.grpc_status(grpc.StatusCode.INTERNAL, "y" * 100_000)
    assert len(status.details) < 2100 and status.details.endswith("(cut at 2000 characters)")
    assert details_of(status).message == status.details  # the two copies agree, as clients check


def test_excerpt_quotes_short_input_whole_and_long_input_by_its_start() -> None:
    assert excerpt("Klingon") == "'Klingon'"
    long = excerpt("x" * 65_536)
    assert long.startswith("'" + "x" * 100 + "'") and long.endswith("... (65536 characters)")
    assert len(long) < 130
    assert excerpt("abcdef", limit=3) == "'abc'... (6 characters)"


def test_an_unknown_64_kb_language_is_refused_in_under_1_kb() -> None:
    with pytest.raises(InvalidInput) as caught:
        resolve_language("q" * 65_536)
    assert len(str(caught.value)) < 1024
    assert "English (en)" in str(caught.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"\xff\xff\xff", "Wire format was corrupt"), (bytes([0x0A, 4, 0x12, 2, 0xFF, 0xFE]), "UTF-8")],
)
def test_the_tolerant_parser_turns_undecodable_bytes_into_a_marker(data: bytes, reason: str) -> None:
    parse = rpc.tolerant(pb.TranscribeRequest.FromString, "qwenasr.v1.TranscribeRequest")
    marker = parse(data)
    assert isinstance(marker, rpc.Unparsable)
    assert reason in marker.reason
    message = str(marker.error())
    assert message.startswith("the request could not be parsed as qwenasr.v1.TranscribeRequest")
    assert "valid UTF-8" in message
    good = pb.TranscribeRequest(config=pb.RecognitionConfig(language="en")).SerializeToString()
    assert parse(good).config.language == "en"


def test_the_innermost_failure_of_nested_task_groups_is_reported() -> None:
    cause = LimitExceeded("queue full", retryable=True)
    nested = ExceptionGroup("channels", [ExceptionGroup("chunks", [cause, ValueError("later")])])
    assert rpc._innermost(nested) is cause
