"""Page allocator and host arena."""

from __future__ import annotations

import os

from hypothesis import given, settings, strategies as st

from kvstore.tiers.arena import HostArena, PageAllocator


def test_best_fit_and_coalescing():
    a = PageAllocator(100)
    x, y, z = a.alloc(10), a.alloc(20), a.alloc(30)
    assert (x, y, z) == (0, 10, 30)
    a.free(y, 20)
    a.free(x, 10)                         # merges with y's run
    assert a.extents() == [(0, 30), (60, 40)]
    assert a.alloc(25) == 0               # best fit: the 30-page run, not the 40
    a.free(0, 25)
    a.free(z, 30)                         # merges both neighbours
    assert a.extents() == [(0, 100)]
    assert a.free_pages == 100 and a.largest_free() == 100
    assert a.alloc(101) is None


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 12)), max_size=200))
def test_random_alloc_free_keeps_invariants(ops):
    total = 64
    a = PageAllocator(total)
    live: list[tuple[int, int]] = []
    for do_alloc, n in ops:
        if do_alloc or not live:
            s = a.alloc(n)
            if s is not None:
                live.append((s, n))
        else:
            s, m = live.pop(n % len(live))
            a.free(s, m)
        used = sorted(live)
        for (s1, n1), (s2, _) in zip(used, used[1:]):
            assert s1 + n1 <= s2            # no overlap
        free = a.extents()
        for (s1, n1), (s2, _) in zip(free, free[1:]):
            assert s1 + n1 < s2             # coalesced: free runs never touch
        assert a.free_pages == total - sum(n for _, n in live) == sum(n for _, n in free)


def test_named_arena_is_shared_through_dev_shm():
    name = f"kvstore-test-{os.getpid()}"
    arena = HostArena(1 << 16, name)
    try:
        assert arena.path is not None and arena.path.exists()
        arena.writable(100, 5)[:] = b"hello"
        with open(arena.path, "rb") as f:
            f.seek(100)
            assert f.read(5) == b"hello"     # another process mapping the file sees the bytes
    finally:
        arena.close()
    assert not arena.path.exists()
