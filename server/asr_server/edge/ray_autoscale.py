"""Ray Serve's autoscaling for AsrService replicas: on live streams and the engine's backlog, not only calls.

Ray's default policy counts ongoing calls, and a live stream is one call for its whole life whether it sends
speech or silence; a replica whose engine falls behind (requests waiting for a batch slot) looks no busier to it
than one that keeps up. Each replica reports its live streams and the engine's waiting requests
(`AsrReplica.record_autoscaling_stats`); this policy asks for enough replicas that each holds at most its target
of either, or of calls in flight, whichever needs most. Ray applies min/max replicas, the up/downscale factors
and delays around it (`policy` in deploy/ray/serve.yaml's autoscaling section).

Ray pickles this module by value into its controller: it imports nothing of Ray nor of the server.
"""

from __future__ import annotations

from typing import Any

# The names of the figures a replica reports (record_autoscaling_stats) and this policy reads.
LIVE_STREAMS_METRIC = "asr_live_streams"
ENGINE_WAITING_METRIC = "asr_engine_waiting_requests"


class LiveLoadPolicy:
    """Replicas for the live load. `policy_kwargs` in the serve file give the targets per replica."""

    def __init__(self, live_streams_per_replica: float, waiting_requests_per_replica: float) -> None:
        if not live_streams_per_replica > 0 or not waiting_requests_per_replica > 0:
            raise ValueError(
                "live_streams_per_replica and waiting_requests_per_replica must be positive, got "
                f"{live_streams_per_replica} and {waiting_requests_per_replica}"
            )
        self.live_streams_per_replica = float(live_streams_per_replica)
        self.waiting_requests_per_replica = float(waiting_requests_per_replica)

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """`ctx` is Ray's AutoscalingContext; the answer is the replicas wanted (Ray rounds and bounds it)."""
        metrics = ctx.aggregated_metrics or {}
        live_streams = sum(metrics.get(LIVE_STREAMS_METRIC, {}).values())
        waiting = sum(metrics.get(ENGINE_WAITING_METRIC, {}).values())
        wanted = max(
            live_streams / self.live_streams_per_replica,
            waiting / self.waiting_requests_per_replica,
            ctx.total_num_requests / ctx.config.get_target_ongoing_requests(),
        )
        # Unrounded, as Ray's own policy answers: Ray applies the scaling factors, rounds up and keeps the
        # result within min_replicas and max_replicas.
        return wanted, {}
