"""Errors raised by the client: one class per gRPC status that callers handle differently.

Every error is an `AsrError` carrying the status `code` and the server's `details`. Some are also a built-in
exception, so code written for the reference `qwen_asr` library keeps working: a bad argument is a `ValueError`,
a deadline a `TimeoutError`, a method the server does not serve a `NotImplementedError`.
"""

from __future__ import annotations

import grpc


class AsrError(Exception):
    """A call failed with a gRPC status."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method} failed: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details

    @property
    def retryable(self) -> bool:
        """UNAVAILABLE (server restarting) and RESOURCE_EXHAUSTED (queue full) may succeed later, with backoff."""
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class InvalidArgumentError(AsrError, ValueError):
    """The server refused the request: malformed audio, an unknown language, an option out of range."""


class DeadlineExceededError(AsrError, TimeoutError):
    """No answer within the deadline (the client's `timeout_s`); the server has dropped the work."""


class UnimplementedError(AsrError, NotImplementedError):
    """The server does not serve this method (an older server, or a feature not built yet)."""


class FailedPreconditionError(AsrError):
    """The server runs without a feature the request needs, e.g. word timestamps without an aligner."""


class ResourceExhaustedError(AsrError):
    """Audio or a message over the server's limits, or its request queue is full (retry with backoff)."""


class UnavailableError(AsrError, ConnectionError):
    """The server cannot be reached, is shutting down, or a sidecar restarted mid-request; retry."""


class UnauthenticatedError(AsrError, PermissionError):
    """The server wants a bearer token (`auth_token=`) and got none or a wrong one."""


_BY_CODE: dict[grpc.StatusCode, type[AsrError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def error_from_rpc(method: str, error: grpc.RpcError, *, timeout_s: float | None = None) -> AsrError:
    """The `AsrError` for a failed call (raise it `from error`)."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout_s is not None:
        details = f"no answer within the {timeout_s:g} s deadline (timeout_s); the server dropped the work"
    return _BY_CODE.get(code, AsrError)(method, code, details)
