"""Tiers that store codec bitstreams, against a real daemon: lossless disk round trips bit-exact
across a restart, lossy DRAM stays within the codec's error, and either side can decode."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from kvstore_client import Durability, KVStoreClient, Namespace
from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc

NS = dict(model="codec-tier-test", dtype="float16", num_layers=4, num_kv_heads=2, head_dim=64, chunk_tokens=64)


def kv_like(tokens: int, seed: int) -> np.ndarray:
    """Correlated along tokens with per-channel offsets, like real K/V (compressible)."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.standard_normal((4, 2, tokens, 2, 64)) * 0.05, axis=2)
    offsets = rng.standard_normal((4, 2, 1, 2, 64)) * 2
    return (walk + offsets).astype(np.float16)


def disk_stats(addr):
    with grpc.insecure_channel(addr) as ch:
        s = admin_pb2_grpc.AdminStub(ch).GetStats(admin_pb2.GetStatsRequest(), timeout=5)
    return next(t for t in s.tiers if t.tier == 3)


@pytest.mark.parametrize("local", [None, False], ids=["shm", "stream"])
def test_lossless_disk_tier_is_bit_exact_after_restart_and_smaller(daemon_factory, local):
    d = daemon_factory(settings=("disk.codec=lossless",))
    toks = list(range(64 * 4))
    kv = kv_like(len(toks), 1)
    with KVStoreClient(d.addr, Namespace(**NS), local=local) as c:
        assert c.store(toks, kv, durability=Durability.PERSISTED) == 4
    used = disk_stats(d.addr).used_bytes
    assert used < kv.nbytes * 0.9, f"lossless disk tier holds {used} bytes for {kv.nbytes} raw"
    d.restart()                       # DRAM empty: every chunk now comes from the codec tier
    with KVStoreClient(d.addr, Namespace(**NS), local=local) as c:
        n, out = c.retrieve(toks)
        assert n == 256 and np.array_equal(out.view(np.uint16), kv.view(np.uint16))
        # A client that cannot decode asks for RAW: the daemon decodes.
        c._get_encoding = 1
        c.arena = None
        n, out = c.retrieve(toks)
        assert n == 256 and np.array_equal(out.view(np.uint16), kv.view(np.uint16))


@pytest.mark.parametrize("level", ["near-lossless", "aggressive"])
def test_lossy_dram_tier_serves_exactly_the_codec_output(daemon_factory, level):
    """The tier stores the configured level: what comes back is bit for bit what the codec
    makes of each chunk (its quality is measured on the real model in docs/benchmarks.md)."""
    from kvstore_native import codec
    d = daemon_factory(settings=(f"dram.codec={level}", "disk.enabled=false"))
    toks = list(range(64 * 2))
    kv = kv_like(len(toks), 2)
    with KVStoreClient(d.addr, Namespace(**NS)) as c:
        c.store(toks, kv)
        n, out = c.retrieve(toks)
    assert n == 128
    lvl = codec.CodecLevel[level.upper().replace("-", "_")]
    for i in range(2):
        chunk = np.ascontiguousarray(kv[:, :, 64 * i:64 * (i + 1)])
        expect = codec.decode(codec.encode(chunk, lvl))
        assert np.array_equal(out[:, :, 64 * i:64 * (i + 1)].view(np.uint16), expect.view(np.uint16))
    assert not np.array_equal(out.view(np.uint16), kv.view(np.uint16))  # it really is lossy


def test_client_asks_for_encoded_chunks(daemon):
    """GetRequest.encoding = CODEC on RAW-stored chunks: the daemon encodes (server.network_codec,
    lossless by default) and the client decodes, bit-exact."""
    from kvstore_wire._proto.kvstore.v1 import data_pb2
    toks = list(range(64 * 2))
    kv = kv_like(len(toks), 3)
    with KVStoreClient(daemon.addr, Namespace(**{**NS, "model": "codec-net"}), local=False) as c:
        c.store(toks, kv)
        c._get_encoding = int(data_pb2.CODEC) if hasattr(data_pb2, "CODEC") else 2
        n, out = c.retrieve(toks)
        assert n == 128 and np.array_equal(out.view(np.uint16), kv.view(np.uint16))
