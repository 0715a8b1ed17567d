"""Fixtures for the tier tests: real payloads, an injectable clock and ``any_tier``.

``any_tier`` is one contract harness per tier and composition (BuildGrid's ``any_storage``):
the DRAM tier and the disk tier under each eviction policy, the wrappers (``FaultyTier`` with
faults off, ``CodecTier`` lossless) and every chain composition config can build (DRAM only,
DRAM+disk write-behind and write-through, codec-configured tiers). Every contract test runs
against all of them.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from kvstore import config as cfg
import kvstore_native as native
from kvstore.chain import TierChain, build_chain
from kvstore.domain.results import PutResult
from kvstore.domain.types import ChunkId, ChunkMeta, DType, Durability, Encoding, Medium
from kvstore.tiers.base import PinTable
from kvstore.tiers.codec import CodecTier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.dram import DramTier
from kvstore.tiers.faults import FaultyTier
from kvstore.tiers.transcode import Transcoder
from kvstore_wire.keys import Namespace

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


#: The namespace every test chunk belongs to (what a codec tier needs to encode them).
TEST_NAMESPACE = Namespace("HuggingFaceTB/SmolLM2-135M", DType.FLOAT16, SMOLLM2_LAYERS, SMOLLM2_KV_HEADS,
                           SMOLLM2_HEAD_DIM, chunk_tokens=1024)


def test_transcoder() -> Transcoder:
    return Transcoder(lambda nid: TEST_NAMESPACE)


test_transcoder.__test__ = False


class _Decoded:
    """A decoded copy standing in for a lease (what a reader of a codec tier does)."""

    def __init__(self, ref, meta, arr) -> None:
        self.cid, self.medium, self.meta = ref.cid, ref.medium, meta
        self.view = memoryview(arr.tobytes()).toreadonly()
        ref.release()

    def release(self) -> None:
        self.view = memoryview(b"")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class TierHarness:
    """Uniform face over a single tier (with its PinTable). Chunks put as RAW that come back
    as bitstreams (a codec tier) are decoded, as a reader would."""

    def __init__(self, tier, pins: PinTable) -> None:
        self.tier, self.pins = tier, pins
        self._raw: set = set()

    def _decoded(self, ref):
        if ref is None or ref.meta.encoding != Encoding.CODEC or ref.cid not in self._raw:
            return ref
        meta, arr = test_transcoder().decode(ref.meta, ref.view)
        return _Decoded(ref, meta, arr)

    def put(self, cid, meta, payload) -> bool:
        if meta.encoding == Encoding.RAW:
            self._raw.add(cid)
        return self._put(cid, meta, memoryview(payload).cast("B"))

    def _put(self, cid, meta, payload) -> bool:
        return self.tier.put(cid, meta, payload)

    def get(self, cid):
        return self._decoded(self._get(cid))

    def _get(self, cid):
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


class ChainHarness(TierHarness):
    def __init__(self, chain: TierChain) -> None:
        super().__init__(None, chain.pins)
        self.mgr = chain

    def _put(self, cid, meta, payload) -> bool:
        return self.mgr.put(cid, meta, payload, Durability.MEMORY) is PutResult.STORED

    def _get(self, cid):
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


def chain_config(path, capacity=BUDGET_BYTES, dram_capacity=None, dram_codec=cfg.TierCodec.RAW,
                 chain: dict | None = None, **disk_kw) -> cfg.Config:
    return cfg.Config(dram=dram_config(cfg.EvictionPolicy.S3FIFO, dram_capacity or capacity, codec=dram_codec),
                      disk=disk_config(path, **{"capacity": capacity, **disk_kw}),
                      chain=cfg.ChainConfig(**(chain or {})))


LOSSLESS = cfg.TierCodec.LOSSLESS
#: Chain compositions config can build, by name: ``chain_config`` keyword arguments.
CHAIN_KINDS = {
    "chain-dram": dict(chain={"tiers": ["dram"]}),
    "chain-dram-disk-behind": dict(),
    "chain-dram-disk-through": dict(chain={"write_mode": "write-through"}),
    "chain-dram-disk-no-promote": dict(chain={"promote_on_hit": False}),
    "chain-disk-codec": dict(codec=LOSSLESS),
    "chain-both-codec": dict(codec=LOSSLESS, dram_codec=LOSSLESS),
}
TIER_KINDS = ["dram-lru", "dram-s3fifo", "disk-lru", "disk-s3fifo", "faulty-disk", "codec-dram", "codec-disk",
              *CHAIN_KINDS]


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
    pins = PinTable(clock)
    if kind.startswith("chain"):
        h = ChainHarness(build_chain(chain_config(tmp_path / "disk", **CHAIN_KINDS[kind]), test_transcoder(),
                                     clock, verify_crc=True))
    elif "dram" in kind:
        tier = DramTier(dram_config(policy), pins, clock, verify_crc=True)
        h = TierHarness(CodecTier(tier, LOSSLESS, test_transcoder()) if kind.startswith("codec") else tier, pins)
    else:
        tier = DiskTier(disk_config(tmp_path / "disk", policy), pins, clock)
        if kind.startswith("codec"):
            tier = CodecTier(tier, LOSSLESS, test_transcoder())
        elif kind.startswith("faulty"):
            tier = FaultyTier(tier)
        h = TierHarness(tier, pins)
    h.kind = kind
    yield h
    h.close()
