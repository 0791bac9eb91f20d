"""The live-load autoscaling policy (edge/ray_autoscale.py) on hand-made contexts; Ray itself is not needed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from asr_server.edge.ray_autoscale import ENGINE_WAITING_METRIC, LIVE_STREAMS_METRIC, LiveLoadPolicy


@dataclass
class _Config:
    target_ongoing_requests: float

    def get_target_ongoing_requests(self) -> float:
        return self.target_ongoing_requests


@dataclass
class _Context:
    """The fields of Ray's AutoscalingContext the policy reads."""

    aggregated_metrics: dict[str, dict[str, float]] | None = None
    total_num_requests: float = 0.0
    config: _Config = field(default_factory=lambda: _Config(100.0))


def _ctx(live: list[float], waiting: list[float], calls: float = 0.0) -> Any:
    metrics = {
        LIVE_STREAMS_METRIC: {f"replica-{i}": v for i, v in enumerate(live)},
        ENGINE_WAITING_METRIC: {f"replica-{i}": v for i, v in enumerate(waiting)},
    }
    return _Context(aggregated_metrics=metrics, total_num_requests=calls)


def test_live_streams_over_every_replica_set_the_replicas() -> None:
    policy = LiveLoadPolicy(live_streams_per_replica=4, waiting_requests_per_replica=100)
    wanted, state = policy(_ctx([6, 4], [0, 0], calls=10))
    assert wanted == pytest.approx(2.5)
    assert state == {}


def test_an_engine_backlog_asks_for_more_than_its_streams_do() -> None:
    policy = LiveLoadPolicy(live_streams_per_replica=100, waiting_requests_per_replica=8)
    wanted, _ = policy(_ctx([10], [40], calls=10))
    assert wanted == pytest.approx(5.0)


def test_calls_in_flight_still_count_beside_the_live_load() -> None:
    policy = LiveLoadPolicy(live_streams_per_replica=100, waiting_requests_per_replica=100)
    wanted, _ = policy(_Context(aggregated_metrics=None, total_num_requests=300, config=_Config(100.0)))
    assert wanted == pytest.approx(3.0)


def test_no_load_asks_for_none_and_ray_keeps_min_replicas() -> None:
    assert LiveLoadPolicy(live_streams_per_replica=4, waiting_requests_per_replica=4)(_ctx([], []))[0] == 0.0


@pytest.mark.parametrize(("live", "waiting"), [(0, 4), (4, 0), (-1, 4)])
def test_targets_must_be_positive(live: float, waiting: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        LiveLoadPolicy(live_streams_per_replica=live, waiting_requests_per_replica=waiting)

