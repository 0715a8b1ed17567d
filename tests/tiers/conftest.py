"""Fixtures for the tier tests: real payloads, an injectable clock and ``any_tier``.

``any_tier`` is one contract harness per tier and composition (BuildGrid's ``any_storage``):
the DRAM tier and the disk tier under each eviction policy, and the ``TierManager``. Every
contract test runs against all of them.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from kvstore import config as cfg
import kvstore_native as native
from kvstore.tiers.base import PinTable
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.dram import DramTier
from kvstore.tiers.manager import PutResult, TierManager
from kvstore.types import ChunkId, ChunkMeta, Durability, Encoding, Medium

#: SmolLM2-135M KV geometry: [layers, K/V, tokens, kv_heads, head_dim] in float16.
SMOLLM2_LAYERS, SMOLLM2_KV_HEADS, SMOLLM2_HEAD_DIM = 30, 3, 64
#: Tokens per chunk in the contract tests: 16 tokens = 368,640 bytes, small enough to be fast.
TEST_CHUNK_TOKENS = 16
#: One test chunk's payload bytes.
CHUNK_BYTES = SMOLLM2_LAYERS * 2 * TEST_CHUNK_TOKENS * SMOLLM2_KV_HEADS * SMOLLM2_HEAD_DIM * 2
#: Byte budget of the tier under test: room for about 8 chunks (plus page/header slack).
BUDGET_BYTES = 8 * (CHUNK_BYTES + 64 * 1024)
PAGE_BYTES = 4096


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def kv_payload(rng: np.random.Generator, tokens: int = TEST_CHUNK_TOKENS) -> np.ndarray:
    """A KV-shaped float16 array with the value range of real activations."""
    shape = (SMOLLM2_LAYERS, 2, tokens, SMOLLM2_KV_HEADS, SMOLLM2_HEAD_DIM)
    return rng.standard_normal(shape, dtype=np.float32).astype(np.float16)


def make_chunk(rng: np.random.Generator, ns: bytes | None = None, tokens: int = TEST_CHUNK_TOKENS):
    """(cid, meta, payload bytes-like) with a random id under namespace ``ns``."""
    ns = ns if ns is not None else bytes(32)
    cid = ChunkId(ns + rng.bytes(32))
    payload = kv_payload(rng, tokens)
    meta = ChunkMeta(tokens, Encoding.RAW, payload.nbytes, native.crc32c(payload))
    return cid, meta, payload


class TierHarness:
    """Uniform face over a single tier (with its PinTable)."""

    def __init__(self, tier, pins: PinTable) -> None:
        self.tier, self.pins = tier, pins

    def put(self, cid, meta, payload) -> bool:
        return self.tier.put(cid, meta, memoryview(payload).cast("B"))

    def get(self, cid):
        return self.tier.get(cid)

    def contains(self, cid) -> bool:
        return self.tier.contains(cid)

    def delete(self, cid) -> bool:
        return self.tier.delete(cid)

    def delete_prefix(self, prefix: bytes) -> int:
        return self.tier.delete_prefix(prefix)

    def pin(self, cid, ttl_s: float = 0) -> None:
        self.pins.pin(cid, ttl_s)

    def ids(self) -> set:
        return {e.cid for e in self.tier.scan()}

    def budgets(self) -> list[tuple[int, int]]:
        s = self.tier.stats()
        return [(s.used_bytes, s.capacity_bytes)]

    def evictions(self) -> int:
        return self.tier.stats().evictions

    def settle(self) -> None:
        pass

    def evict_all(self) -> None:
        self.tier.evict(self.tier.stats().capacity_bytes)

    def close(self) -> None:
        self.tier.close()


class ManagerHarness(TierHarness):
    def __init__(self, mgr: TierManager) -> None:
        self.mgr = mgr

    def put(self, cid, meta, payload) -> bool:
        return self.mgr.put(cid, meta, memoryview(payload).cast("B"), Durability.MEMORY) is PutResult.STORED

    def get(self, cid):
        return self.mgr.get(cid)

    def contains(self, cid) -> bool:
        return self.mgr.locate([cid])[0] is not None

    def delete(self, cid) -> bool:
        return self.mgr.delete(cid)

    def delete_prefix(self, prefix: bytes) -> int:
        return self.mgr.delete_prefix(prefix)

    def pin(self, cid, ttl_s: float = 0) -> None:
        assert self.mgr.pin(cid, ttl_s)

    def ids(self) -> set:
        return {k.cid for k in self.mgr.entries(limit=10_000)}

    def budgets(self) -> list[tuple[int, int]]:
        return [(s.used_bytes, s.capacity_bytes) for s in self.mgr.stats().tiers]

    def evictions(self) -> int:
        return sum(s.evictions for s in self.mgr.stats().tiers)

    def settle(self) -> None:
        self.mgr.flush(timeout_s=30)

    def evict_all(self) -> None:
        self.mgr.evict()

    def close(self) -> None:
        self.mgr.close()


def dram_config(policy=cfg.EvictionPolicy.LRU, capacity=BUDGET_BYTES, **kw) -> cfg.DramConfig:
    return cfg.DramConfig(capacity_bytes=capacity, page_bytes=PAGE_BYTES, policy=policy, **kw)


def disk_config(path, policy=cfg.EvictionPolicy.LRU, capacity=BUDGET_BYTES, fsync=False, **kw) -> cfg.DiskConfig:
    return cfg.DiskConfig(path=path, capacity_bytes=capacity, policy=policy, fsync=fsync,
                          index_map_bytes=64 * 1024**2, **kw)


def manager_config(path, capacity=BUDGET_BYTES, dram_capacity=None, **disk_kw) -> cfg.Config:
    return cfg.Config(dram=dram_config(cfg.EvictionPolicy.S3FIFO, dram_capacity or capacity),
                      disk=disk_config(path, **{"capacity": capacity, **disk_kw}))


TIER_KINDS = ["dram-lru", "dram-s3fifo", "disk-lru", "disk-s3fifo", "manager"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=TIER_KINDS)
def any_tier(request, tmp_path, clock):
    kind = request.param
    policy = cfg.EvictionPolicy.S3FIFO if kind.endswith("s3fifo") else cfg.EvictionPolicy.LRU
    if kind.startswith("dram"):
        pins = PinTable(clock)
        h = TierHarness(DramTier(dram_config(policy), pins, clock, verify_crc=True), pins)
    elif kind.startswith("disk"):
        pins = PinTable(clock)
        h = TierHarness(DiskTier(disk_config(tmp_path / "disk", policy), pins, clock), pins)
    else:
        h = ManagerHarness(TierManager(manager_config(tmp_path / "disk"), clock, dram_verify_crc=True))
    h.kind = kind
    yield h
    h.close()
