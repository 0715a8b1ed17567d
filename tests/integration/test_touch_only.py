"""``LeaseReadRequest.touch_only``: a same-host reader that copied chunks without a lease (the
GPU path's lease-free loads) reports them, and the daemon counts them as hits and refreshes
their recency exactly as a lease would, so chunks read that way are not the ones evicted.
Nothing is leased, and a key the arena does not hold is reported absent, not fetched."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from kvstore_client import KVStoreClient, Namespace
from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc, local_pb2, local_pb2_grpc

NS = dict(model="touch-only", dtype="float16", num_layers=4, num_kv_heads=2, head_dim=32, chunk_tokens=64)
CHUNK = 4 * 2 * 64 * 2 * 32 * 2   # bytes of one chunk


def _kv(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, 2, 64, 2, 32)).astype(np.float16)


def _entry(admin, ns_id: bytes, key: bytes):
    return admin.Inspect(admin_pb2.InspectRequest(namespace_id=ns_id, key=key), timeout=5).entry


def test_touch_counts_hits_and_leases_nothing(daemon):
    with KVStoreClient(daemon.addr, Namespace(**NS)) as c, grpc.insecure_channel(daemon.addr) as ch:
        local, admin = local_pb2_grpc.LocalDataStub(ch), admin_pb2_grpc.AdminStub(ch)
        toks = list(range(100_000, 100_064))
        c.store(toks, _kv(1))
        key = c.keys(toks)[0]
        absent = c.keys(list(range(200_000, 200_064)))[0]
        before = _entry(admin, c.namespace_id, key)
        r = local.LeaseRead(local_pb2.LeaseReadRequest(namespace_id=c.namespace_id, keys=[key, absent, key],
                                                       touch_only=True), timeout=5)
        assert r.lease_id == 0
        assert [(e.index, e.found) for e in r.extents] == [(0, True), (1, False), (2, True)]
        assert all(e.offset == 0 and e.length == 0 for e in r.extents)   # nothing to read: nothing leased
        after = _entry(admin, c.namespace_id, key)
        assert after.hits == before.hits + 2
        assert after.last_access_unix_s >= before.last_access_unix_s
        # The chunk is not held: a delete goes through at once and a touch then finds nothing.
        c.delete([key])
        r = local.LeaseRead(local_pb2.LeaseReadRequest(namespace_id=c.namespace_id, keys=[key], touch_only=True),
                            timeout=5)
        assert not r.extents[0].found


def test_touched_chunks_survive_the_eviction_of_untouched_ones(daemon_factory):
    # Room for four chunks (one page each, after the header page), LRU, nothing below: the
    # fifth store evicts the least recently used one.
    d = daemon_factory(settings=(f"dram.capacity_bytes={5 * CHUNK}", "dram.page_bytes=64KiB", 'dram.policy="lru"', "disk.enabled=false"))
    with KVStoreClient(d.addr, Namespace(**NS)) as c, grpc.insecure_channel(d.addr) as ch:
        local = local_pb2_grpc.LocalDataStub(ch)
        runs = [list(range(i * 1000, i * 1000 + 64)) for i in range(5)]
        for i, toks in enumerate(runs[:4]):
            c.store(toks, _kv(i))
        oldest = c.keys(runs[0])[0]
        r = local.LeaseRead(local_pb2.LeaseReadRequest(namespace_id=c.namespace_id, keys=[oldest], touch_only=True),
                            timeout=5)
        assert r.extents[0].found
        c.store(runs[4], _kv(4))
        assert c.lookup(runs[0]).matched_tokens == 64    # touched: kept
        assert c.lookup(runs[1]).matched_tokens == 0     # the least recently used instead


def test_touch_checks_the_namespace_and_the_key_limit(daemon):
    with KVStoreClient(daemon.addr, Namespace(**NS)) as c, grpc.insecure_channel(daemon.addr) as ch:
        local = local_pb2_grpc.LocalDataStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            local.LeaseRead(local_pb2.LeaseReadRequest(namespace_id=b"\x01" * 32, keys=[b"\x02" * 32],
                                                       touch_only=True), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            local.LeaseRead(local_pb2.LeaseReadRequest(namespace_id=c.namespace_id, keys=[b"short"],
                                                       touch_only=True), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
