"""Domain errors. The gRPC edge maps each class to one status code; nothing below the edge knows gRPC."""

# How long a caller told it may retry waits first, unless the raise site knows better.
DEFAULT_RETRY_AFTER_S = 1.0
# The most of a caller's own input an error message quotes: enough to recognise it, never its whole payload.
EXCERPT_LIMIT = 100


class AsrError(Exception):
    """Base of every error the server reports to a caller. The message is shown to the caller as is.

    `retry_after_s` is set when trying the same request again can succeed (after about that long), else None.
    """

    retry_after_s: float | None = None


class InvalidInput(AsrError):
    """The request is malformed (INVALID_ARGUMENT). Say what was wrong and what is accepted."""


class LimitExceeded(AsrError):
    """The request is over a configured limit or the server is full (RESOURCE_EXHAUSTED).

    The message names the limit; `retryable` says whether trying again later can succeed (a full queue)
    or not (audio longer than the limit).
    """

    def __init__(self, message: str, *, retryable: bool = False, retry_after_s: float = DEFAULT_RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s if retryable else None


class FailedPrecondition(AsrError):
    """The server is not set up for this request (FAILED_PRECONDITION), e.g. timestamps with no aligner."""


class Unavailable(AsrError):
    """Transient: shutting down, or a sidecar restarted mid-request (UNAVAILABLE). Retrying can succeed."""

    def __init__(self, message: str, *, retry_after_s: float = DEFAULT_RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def excerpt(text: str, limit: int = EXCERPT_LIMIT) -> str:
    """`text` quoted (repr) for an error message, cut to its first `limit` characters when longer.

    A caller's input echoed whole could make the message larger than the caller can receive (a status message
    travels in an HTTP/2 trailer, which clients cap at a few KB).
    """
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
