"""KvPageManager: the free list, the scratch page, reference counts (pure, no torch)."""

from __future__ import annotations

import random

import pytest

from asr_server.engine.continuous.kv_manager import KvPageManager


def test_pages_are_handed_out_lowest_first_and_page_zero_never() -> None:
    kv = KvPageManager(num_pages=5, page_size=16)
    assert kv.usable_pages == 4 and kv.num_free == 4
    assert kv.allocate(4) == [1, 2, 3, 4]
    assert kv.num_free == 0 and not kv.can_allocate(1)
    with pytest.raises(RuntimeError, match="1 KV pages asked for, 0 free"):
        kv.allocate(1)


def test_a_failed_allocation_takes_nothing() -> None:
    kv = KvPageManager(num_pages=4, page_size=16)
    kv.allocate(2)
    with pytest.raises(RuntimeError):
        kv.allocate(2)
    assert kv.num_free == 1 and kv.allocate(1) == [3]


def test_pages_for_rounds_up() -> None:
    kv = KvPageManager(num_pages=8, page_size=16)
    assert [kv.pages_for(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_a_freed_page_is_the_next_one_handed_out() -> None:
    kv = KvPageManager(num_pages=6, page_size=4)
    first = kv.allocate(2)
    kv.allocate(1)
    assert kv.free(first) == first
    assert kv.allocate(1) == [first[-1]]


def test_a_shared_page_returns_to_the_free_list_only_when_its_last_owner_lets_go() -> None:
    kv = KvPageManager(num_pages=4, page_size=16)
    pages = kv.allocate(2)
    kv.incref(pages[:1])  # a second request shares the prompt's first page
    assert [kv.refcount(p) for p in pages] == [2, 1]
    assert kv.decref(pages) == [pages[1]]
    assert kv.refcount(pages[0]) == 1 and kv.num_free == 2
    assert kv.decref(pages[:1]) == [pages[0]]
    assert kv.num_free == 3


@pytest.mark.parametrize("page", [0, 3, 99])
def test_free_or_scratch_or_unknown_pages_cannot_be_released_or_shared(page: int) -> None:
    kv = KvPageManager(num_pages=4, page_size=16)
    kv.allocate(2)  # pages 1 and 2; 3 is free
    with pytest.raises(ValueError):
        kv.decref([page])
    with pytest.raises(ValueError):
        kv.incref([page])


def test_too_small_a_cache_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 pages"):
        KvPageManager(num_pages=1, page_size=16)


def test_random_allocations_shares_and_frees_lose_no_page_and_own_none_twice() -> None:
    rng = random.Random(3)
    kv = KvPageManager(num_pages=33, page_size=8)
    owners: list[list[int]] = []
    for _ in range(2000):
        action = rng.random()
        if action < 0.45:
            n = rng.randint(0, 6)
            if kv.can_allocate(n):
                owners.append(kv.allocate(n))
        elif action < 0.6 and owners:
            shared = rng.choice(owners)[: rng.randint(0, 3)]
            kv.incref(shared)
            owners.append(list(shared))
        elif owners:
            kv.free(owners.pop(rng.randrange(len(owners))))
        held: dict[int, int] = {}
        for pages in owners:
            for p in pages:
                held[p] = held.get(p, 0) + 1
        free = kv.free_pages()
        assert 0 not in held and 0 not in free
        assert len(set(free)) == len(free) and not set(free) & set(held)
        assert set(free) | set(held) == set(range(1, 33))
        assert all(kv.refcount(p) == n for p, n in held.items())
