"""Loaded into Ray Serve's gRPC proxy process (one of its `grpc_servicer_functions`): our status for a dead replica.

Ray Serve 2.60's proxy answers a call whose replica died (the process was killed, the node was lost) INTERNAL,
"The actor died unexpectedly before finishing this task" (ray/serve/_private/grpc_util.py,
get_grpc_response_status: only DeploymentUnavailableError becomes UNAVAILABLE). Our contract says UNAVAILABLE:
the call may be retried and a new call goes to a live replica. The proxy offers no hook for its status mapping, so
this wraps it, for exactly the Ray version it was written against; with any other version it changes nothing and
says so in the proxy's log (docs/scale-out.md, "Limits").

Kept apart from edge/ray_serve.py so that the proxy imports grpc and Ray only, not the server and its engine.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

logger = logging.getLogger(__name__)

PATCHED_RAY_VERSION = "2.60.0"
REPLICA_DIED_MESSAGE = (
    "the replica serving this call died ({cause}); retry: a new call goes to a live replica "
    "(a live stream resumes from the audio after its last final)"
)


def add_replica_death_status_to_server(servicer: Any, server: Any) -> None:
    """Has the signature of a generated add_*Servicer_to_server, so Ray's proxy calls it at start; registers
    nothing on the server, and makes the proxy answer UNAVAILABLE for a call whose replica died."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve._private import proxy
    from ray.serve._private.proxy_request_response import ResponseStatus

    if ray.__version__ != PATCHED_RAY_VERSION:
        logger.warning(
            "Ray %s, not %s: a call whose replica died is answered as this Ray answers it (INTERNAL in 2.60)",
            ray.__version__,
            PATCHED_RAY_VERSION,
        )
        return
    original = proxy.get_grpc_response_status  # type: ignore[attr-defined]
    if getattr(original, "asr_replica_death", False):
        return  # this proxy process was set up once already

    def get_grpc_response_status(exc: BaseException, request_timeout_s: float | None, request_id: str) -> Any:
        # Only the replica's own death: an error the user code raised stays what the user code set.
        if isinstance(exc, RayActorError | ActorUnavailableError):
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return ResponseStatus(
                code=grpc.StatusCode.UNAVAILABLE, is_error=True, message=REPLICA_DIED_MESSAGE.format(cause=cause)
            )
        return original(exc, request_timeout_s, request_id)

    get_grpc_response_status.asr_replica_death = True  # type: ignore[attr-defined]
    proxy.get_grpc_response_status = get_grpc_response_status  # type: ignore[attr-defined]
