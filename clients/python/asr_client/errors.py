"""Errors raised by the client: one class per gRPC status that callers handle differently.

Every error is an `AsrError` carrying the status `code` and the server's `details`. Some are also a built-in
exception, so code written for the reference `qwen_asr` library keeps working: what the reference raises as a
`ValueError` (a bad argument: `InvalidArgumentError`; a feature the setup lacks, e.g. timestamps without a forced
aligner: `FailedPreconditionError`) is one here too, a deadline a `TimeoutError`, a method the server does not
serve a `NotImplementedError`. `except ValueError` in ported code catches both.

Whether to retry is the server's word: it puts a `google.rpc.RetryInfo` in the status details of the errors that
retrying can cure (a full queue, a restart), and `retryable` / `retry_delay_s` read it.
"""

from __future__ import annotations

from typing import cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class AsrError(Exception):
    """A call failed with a gRPC status."""

    def __init__(
        self, method: str, code: grpc.StatusCode, details: str, *, retry_delay_s: float | None = None
    ) -> None:
        super().__init__(f"{method} failed: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details
        # How long the server asked to wait before retrying (its RetryInfo), or None when it sent none.
        self.retry_delay_s = retry_delay_s

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed later: the server said so (RetryInfo: a full queue, a restart), or
        the server could not be reached at all (UNAVAILABLE). Audio over a limit is RESOURCE_EXHAUSTED too, and
        not retryable."""
        return self.retry_delay_s is not None or self.code == grpc.StatusCode.UNAVAILABLE


class InvalidArgumentError(AsrError, ValueError):
    """The server refused the request: malformed audio, an unknown language, an option out of range."""


class DeadlineExceededError(AsrError, TimeoutError):
    """No answer within the deadline (the client's `timeout_s`); the server has dropped the work."""


class UnimplementedError(AsrError, NotImplementedError):
    """The server does not serve this method (an older server, or a feature not built yet)."""


class OutOfRangeError(AsrError):
    """A live stream sent no audio for the server's --stream-idle-timeout-s (GetServerInfo's
    `limits.stream_idle_timeout_ms`) and was ended; open a new stream when audio comes again."""


class FailedPreconditionError(AsrError, ValueError):
    """The server runs without a feature the request needs, e.g. word timestamps without an aligner. Also a
    `ValueError`: `qwen_asr` raises ValueError for `return_time_stamps=True` on a model loaded without one."""


class ResourceExhaustedError(AsrError):
    """Audio or a message over the server's limits (not `retryable`), or its request queue is full (`retryable`:
    wait `retry_delay_s`, then back off)."""


class UnavailableError(AsrError, ConnectionError):
    """The server cannot be reached, is shutting down, or a sidecar restarted mid-request; retry."""


class UnauthenticatedError(AsrError, PermissionError):
    """The server wants a bearer token (`auth_token=`) and got none or a wrong one."""


_BY_CODE: dict[grpc.StatusCode, type[AsrError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def error_from_rpc(method: str, error: grpc.RpcError, *, timeout_s: float | None = None) -> AsrError:
    """The `AsrError` for a failed call (raise it `from error`)."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    retry_delay_s = _retry_delay_s(error)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout_s is not None:
        details = f"no answer within the {timeout_s:g} s deadline (timeout_s); the server dropped the work"
    return _BY_CODE.get(code, AsrError)(method, code, details, retry_delay_s=retry_delay_s)


def _retry_delay_s(error: grpc.RpcError) -> float | None:
    """The retry delay of the RetryInfo in the status details (trailer grpc-status-details-bin), else None."""
    if not hasattr(error, "trailing_metadata"):
        return None
    try:
        # A sync call's error is a grpc.Call; grpc.aio's AioRpcError has the same code/details/trailing_metadata.
        status = rpc_status.from_call(cast(grpc.Call, error))
    except ValueError:  # details that contradict the status (rewritten on the way): trust neither
        return None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None
