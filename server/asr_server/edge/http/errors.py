"""The one map from domain errors (asr_server.errors) to HTTP statuses and OpenAI's error body.

OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`; its SDKs pick the exception class by the status
(400 BadRequestError, 401 AuthenticationError, 413, 429 RateLimitError, 503 InternalServerError) and show `message`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from asr_server.errors import AsrError, FailedPrecondition, InvalidInput, LimitExceeded, Unavailable


class Unauthenticated(AsrError):
    """No or a wrong `Authorization: Bearer` token (the HTTP edge's own: gRPC refuses in its interceptor)."""


class NotFound(AsrError):
    """No such route or model."""


@dataclass(frozen=True)
class HttpError:
    status_code: int
    type: str  # OpenAI's error.type
    code: str  # OpenAI's error.code
    message: str
    param: str | None = None
    retry_after_s: float | None = None
    # Why a refused request was refused, as RpcOutcome.refused: "capacity", "limit", "unavailable" or "".
    refused: str = ""

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        # Retry-After takes whole seconds; 0 would invite an immediate hammering.
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def http_error(exc: AsrError, *, param: str | None = None) -> HttpError:
    """The status, OpenAI type and code of a domain error. The order matters: the first class that matches wins."""
    message = str(exc)
    if isinstance(exc, Unauthenticated):
        return HttpError(401, "invalid_request_error", "invalid_api_key", message)
    if isinstance(exc, NotFound):
        return HttpError(404, "invalid_request_error", "not_found", message, param)
    if isinstance(exc, InvalidInput):
        return HttpError(400, "invalid_request_error", "invalid_value", message, param)
    if isinstance(exc, FailedPrecondition):
        # Not set up for this request (word timestamps without the aligner): the request cannot be served as sent.
        return HttpError(400, "invalid_request_error", "unsupported_value", message, param)
    if isinstance(exc, LimitExceeded):
        if exc.retryable:
            # The queue or the decoded-audio budget is full: trying again later can succeed.
            return HttpError(429, "rate_limit_error", "queue_full", message, None, exc.retry_after_s, "capacity")
        # Over a configured limit (bytes, duration): the same request will never fit.
        return HttpError(413, "invalid_request_error", "limit_exceeded", message, param, None, "limit")
    if isinstance(exc, Unavailable):
        return HttpError(503, "server_error", "unavailable", message, None, exc.retry_after_s, "unavailable")
    # Any other AsrError (an idle timeout cannot happen here): the server's fault.
    return HttpError(500, "server_error", "internal_error", message)


def internal_error(exc: BaseException) -> HttpError:
    return HttpError(500, "server_error", "internal_error", f"internal error: {type(exc).__name__}: {exc}")
