"""asr_server/heap.py: the start-up heap leaves the collector's generations."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from asr_server.heap import freeze_startup_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_objects_alive_at_start_up_are_frozen_and_later_ones_are_not(unfrozen: None) -> None:
    survivor = [[object()] for _ in range(100)]
    frozen = freeze_startup_heap("test")
    # Frozen objects that die later leave the count (other threads of the test process free some at any time).
    assert len(survivor) < gc.get_freeze_count() <= frozen
    later = [object()]
    tracked = {id(o) for o in gc.get_objects()}
    # gc.get_objects() lists the collected generations only: frozen objects are out of them.
    assert id(survivor) not in tracked
    assert id(later) in tracked
