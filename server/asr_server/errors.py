"""Domain errors. The gRPC edge maps each class to one status code; nothing below the edge knows gRPC."""


class AsrError(Exception):
    """Base of every error the server reports to a caller. The message is shown to the caller as is."""


class InvalidInput(AsrError):
    """The request is malformed (INVALID_ARGUMENT). Say what was wrong and what is accepted."""


class LimitExceeded(AsrError):
    """The request is over a configured limit or the server is full (RESOURCE_EXHAUSTED).

    The message names the limit; `retryable` says whether trying again later can succeed (a full queue)
    or not (audio longer than the limit).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class FailedPrecondition(AsrError):
    """The server is not set up for this request (FAILED_PRECONDITION), e.g. timestamps with no aligner."""


class Unavailable(AsrError):
    """Transient: shutting down, or a sidecar restarted mid-request (UNAVAILABLE). Retrying can succeed."""


class Cancelled(AsrError):
    """The caller went away; the work was dropped."""
