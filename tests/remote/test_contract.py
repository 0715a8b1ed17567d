"""The tier contract over RemoteTier (the shape of tests/tiers/test_contract.py), minus what
Redis owns (eviction, pins): round trips, immutability, presence, delete, scan, batches."""

from __future__ import annotations

import numpy as np

import kvstore_native as native
from kvstore.types import ChunkId, ChunkMeta, Encoding, Medium

from .conftest import make_chunk


def _read(tier, cid) -> bytes | None:
    ref = tier.get(cid)
    if ref is None:
        return None
    with ref:
        assert ref.view.readonly and ref.medium == Medium.REMOTE
        assert ref.meta.payload_bytes == len(ref.view)
        return bytes(ref.view)


def test_round_trip_is_bit_exact(remote, rng, ns):
    chunks = [make_chunk(rng, ns) for _ in range(4)]
    for cid, meta, payload in chunks:
        assert remote.put(cid, meta, memoryview(payload).cast("B"))
    for cid, meta, payload in chunks:
        got = _read(remote, cid)
        np.testing.assert_array_equal(np.frombuffer(got, np.float16).reshape(payload.shape), payload)
    s = remote.remote_stats()
    assert s.stored == 4 and s.hits == 4 and s.errors == 0


def test_odd_sizes_round_trip(remote, rng, ns):
    for n in (0, 1, 4095, 4096, 4097, 100_003):
        data = rng.bytes(n)
        cid = ChunkId(ns + rng.bytes(32))
        assert remote.put(cid, ChunkMeta(1, Encoding.CODEC, n, native.crc32c(data)), data)
        assert _read(remote, cid) == data


def test_chunks_are_immutable(remote, rng, ns):
    cid, meta, payload = make_chunk(rng, ns)
    assert remote.put(cid, meta, payload)
    _, meta2, other = make_chunk(rng, ns)
    assert not remote.put(cid, meta2, other)
    assert _read(remote, cid) == payload.tobytes()
    assert remote.remote_stats().already_present == 1


def test_contains_and_delete(remote, rng, ns):
    cid, meta, payload = make_chunk(rng, ns)
    assert not remote.contains(cid)
    assert _read(remote, cid) is None
    remote.put(cid, meta, payload)
    assert remote.contains(cid)
    assert remote.delete(cid)
    assert not remote.contains(cid)
    assert _read(remote, cid) is None
    assert not remote.delete(cid)


def test_batches_and_longest_prefix(remote, rng, ns):
    chunks = [make_chunk(rng, ns, tokens=4) for _ in range(12)]
    for cid, meta, payload in chunks[:7]:
        remote.put(cid, meta, payload)
    cids = [c for c, _, _ in chunks]
    assert remote.contains_many(cids) == [True] * 7 + [False] * 5
    assert remote.longest_prefix(cids) == 7
    assert remote.longest_prefix(cids[7:]) == 0
    got = remote.get_many(cids)
    assert [g is not None for g in got] == [True] * 7 + [False] * 5
    for ref, (_, _, payload) in zip(got[:7], chunks):
        assert bytes(ref.view) == payload.tobytes()


def test_values_carry_a_ttl(remote, redis_cluster, rng, ns):
    import redis
    cid, meta, payload = make_chunk(rng, ns, tokens=1)
    remote.put(cid, meta, payload)
    raw = redis.RedisCluster(host="127.0.0.1", port=int(redis_cluster.nodes[0].rsplit(":", 1)[1]))
    ttl = raw.pttl(remote.keys.chunk(cid))
    raw.close()
    assert 0 < ttl <= remote.cfg.ttl_s * 1000


def test_scan_and_prefix_delete(remote, rng):
    ns_a, ns_b = rng.bytes(32), rng.bytes(32)
    a = [make_chunk(rng, ns_a, tokens=2) for _ in range(3)]
    b = [make_chunk(rng, ns_b, tokens=2) for _ in range(2)]
    for cid, meta, payload in a + b:
        remote.put(cid, meta, payload)
    assert {e.cid for e in remote.scan(ns_a)} == {c for c, _, _ in a}
    listed = [e.cid for e in remote.scan(ns_b)]
    assert listed == sorted(c for c, _, _ in b)
    assert remote.delete_prefix(ns_a) == 3
    assert list(remote.scan(ns_a)) == []
    for cid, _, payload in b:
        assert _read(remote, cid) == payload.tobytes()


def test_listener_sees_store_and_delete(remote, rng, ns):
    seen = []
    remote.listener = lambda cid, medium, present: seen.append((cid, medium, present))
    cid, meta, payload = make_chunk(rng, ns, tokens=1)
    remote.put(cid, meta, payload)
    remote.delete(cid)
    assert seen == [(cid, Medium.REMOTE, True), (cid, Medium.REMOTE, False)]
