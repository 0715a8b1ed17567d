"""Eviction policies on their own, driven by a tiny byte-budgeted cache model."""

from __future__ import annotations

import pytest

from kvstore import config as cfg
from kvstore.tiers.policies import LRU, S3FIFO, make_policy


class ModelCache:
    """What a tier does with a policy: hit -> touch; miss -> insert, evicting by victims()."""

    def __init__(self, policy, capacity_items: int) -> None:
        self.policy, self.capacity, self.items = policy, capacity_items, set()

    def access(self, key: bytes) -> bool:
        if key in self.items:
            self.policy.touch(key)
            return True
        while len(self.items) >= self.capacity:
            for v in self.policy.victims():
                self.items.discard(v)
                self.policy.remove(v, evicted=True)
                break
        self.items.add(key)
        self.policy.insert(key, 1)
        return False


def _key(i: int) -> bytes:
    return i.to_bytes(8, "big")


@pytest.mark.parametrize("kind", list(cfg.EvictionPolicy))
def test_factory_builds_the_named_policy(kind):
    p = make_policy(kind, 100)
    assert p.name == kind.value


def test_lru_evicts_least_recently_used_first():
    p = LRU()
    for i in range(4):
        p.insert(_key(i), 1)
    p.touch(_key(0))
    assert list(p.victims()) == [_key(1), _key(2), _key(3), _key(0)]


def test_scan_resistance_s3fifo_keeps_hot_set_lru_does_not():
    capacity, hot = 100, 50
    results = {}
    for policy in (LRU(capacity), S3FIFO(capacity)):
        cache = ModelCache(policy, capacity)
        for _ in range(5):                       # warm the hot set
            for i in range(hot):
                cache.access(_key(i))
        for i in range(10_000, 10_000 + 5 * capacity):   # one-pass scan
            cache.access(_key(i))
        results[policy.name] = sum(cache.access(_key(i)) for i in range(hot)) / hot
    assert results["s3fifo"] >= 0.9
    assert results["lru"] == 0.0


def test_s3fifo_ghost_readmits_into_main():
    p = S3FIFO(10)
    cache = ModelCache(p, 10)
    for i in range(11):
        cache.access(_key(i))        # key 0 evicted from small, remembered in ghost
    assert _key(0) not in cache.items
    cache.access(_key(0))
    assert _key(0) in p._main


@pytest.mark.parametrize("policy", [LRU(10), S3FIFO(10)], ids=["lru", "s3fifo"])
def test_victims_terminates_when_everything_is_skipped(policy):
    for i in range(10):
        policy.insert(_key(i), 1)
        policy.touch(_key(i))
    seen = list(policy.victims())        # nothing removed: every candidate skipped
    assert set(seen) == {_key(i) for i in range(10)}
    assert len(policy) == 10


@pytest.mark.parametrize("policy", [LRU(10), S3FIFO(10)], ids=["lru", "s3fifo"])
def test_remove_and_untracked_ids_are_ignored(policy):
    policy.insert(_key(1), 1)
    policy.touch(_key(2))
    policy.remove(_key(2))
    policy.remove(_key(1))
    assert len(policy) == 0 and _key(1) not in policy
    assert list(policy.victims()) == []
