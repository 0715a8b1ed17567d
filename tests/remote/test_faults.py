"""Faults on a private cluster: corruption inside Redis, a paused node, a master killed
mid-transfer (failover), and no Redis at all. Every call returns within the deadline as a
miss/skip, nothing corrupt is served, and uploads resume after recovery."""

from __future__ import annotations

import time

import redis

from kvstore.config import RemoteConfig
from kvstore.tiers.remote import RemoteTier, build_remote
from kvstore_testing.redis_cluster import free_ports

from .conftest import TEST_TIMEOUT_MS, make_chunk, remote_config, ready

#: A call may overrun its deadline by the join slack and the test's own scheduling noise.
DEADLINE_S = TEST_TIMEOUT_MS / 1000 + 0.3


def _raw(cluster) -> redis.RedisCluster:
    host, port = cluster.nodes[0].rsplit(":", 1)
    return redis.RedisCluster(host=host, port=int(port))


def _owner(raw: redis.RedisCluster, key: bytes) -> int:
    return raw.get_node_from_key(key).port


def test_corrupt_value_is_detected_and_dropped(redis_cluster, rng, ns):
    tier = ready(RemoteTier(remote_config(redis_cluster)))
    raw = _raw(redis_cluster)
    try:
        flipped, garbage, truncated = (make_chunk(rng, ns, tokens=2) for _ in range(3))
        for c in (flipped, garbage, truncated):
            assert tier.put(*c)
        k = tier.keys.chunk(flipped[0])
        v = bytearray(raw.get(k))
        v[len(v) // 2] ^= 0x10
        raw.set(k, bytes(v))
        raw.set(tier.keys.chunk(garbage[0]), b"not a kvstore value")
        k3 = tier.keys.chunk(truncated[0])
        raw.set(k3, raw.get(k3)[:-1])
        for c in (flipped, garbage, truncated):
            assert tier.get(c[0]) is None
            assert raw.exists(tier.keys.chunk(c[0])) == 0      # dropped from Redis
        assert tier.remote_stats().corrupt == 3
    finally:
        raw.close()
        tier.close()


def test_redis_entirely_down_is_a_miss_not_an_error(rng, ns):
    ports = free_ports(1, start=40000)
    tier = RemoteTier(RemoteConfig(enabled=True, nodes=[f"127.0.0.1:{ports[0]}"], timeout_ms=200,
                                   retry_backoff_s=0.2))
    try:
        cid, meta, payload = make_chunk(rng, ns, tokens=1)
        for _ in range(3):
            t0 = time.monotonic()
            assert tier.get(cid) is None
            assert not tier.put(cid, meta, payload)
            assert tier.contains_many([cid]) == [False]
            assert tier.longest_prefix([cid]) == 0
            assert list(tier.scan()) == []
            assert time.monotonic() - t0 < 5 * 0.5
        s = tier.remote_stats()
        assert s.errors >= 3 and s.hits == 0 and s.fast_fails > 0
    finally:
        tier.close()


def test_paused_node_is_a_miss_within_the_deadline(fresh_cluster, rng, ns):
    parts = ready(build_remote(remote_config(fresh_cluster, retry_backoff_s=0.05)))
    tier = parts.tier
    raw = _raw(fresh_cluster)
    try:
        chunks = [make_chunk(rng, ns, tokens=2) for _ in range(12)]
        for c in chunks:
            assert tier.put(*c)
        victim = _owner(raw, tier.keys.chunk(chunks[0][0]))
        fresh_cluster.pause(victim)
        late = [make_chunk(rng, ns, tokens=2) for _ in range(12)]
        try:
            t0 = time.monotonic()
            assert tier.get(chunks[0][0]) is None
            assert time.monotonic() - t0 < DEADLINE_S
            time.sleep(0.1)  # past the backoff window
            t0 = time.monotonic()
            got = tier.get_many([c[0] for c in chunks])
            assert time.monotonic() - t0 < DEADLINE_S
            for ref, c in zip(got, chunks):    # what did arrive is intact
                assert ref is None or bytes(ref.view) == c[2].tobytes()
            for c in late:                     # uploads while the node is paused
                assert parts.uploader.submit(*c)
            time.sleep(1.0)
        finally:
            fresh_cluster.resume(victim)
        assert parts.uploader.flush(timeout_s=60)
        assert all(tier.contains_many([c[0] for c in late]))
        deadline = time.monotonic() + 10
        while tier.get(chunks[0][0]) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert bytes(tier.get(chunks[0][0]).view) == chunks[0][2].tobytes()
    finally:
        raw.close()
        parts.close()


def test_acl_password(tmp_path, rng, ns):
    from kvstore_testing.redis_cluster import LocalRedisCluster, available
    import pytest
    if not available():
        pytest.skip("redis-server / redis-cli not installed")
    with LocalRedisCluster(tmp_path / "auth", password="s3cret-pass-123") as c:
        good = ready(RemoteTier(remote_config(c, username="default", password="s3cret-pass-123")))
        bad = RemoteTier(remote_config(c, password="wrong-password-000"))
        try:
            cid, meta, payload = make_chunk(rng, ns, tokens=1)
            assert good.put(cid, meta, payload)
            assert bytes(good.get(cid).view) == payload.tobytes()
            assert bad.get(cid) is None and not bad.put(cid, meta, payload)
            assert bad.remote_stats().errors >= 1
        finally:
            good.close()
            bad.close()


def test_master_killed_mid_transfer_fails_over_and_uploads_resume(fresh_cluster, rng, ns):
    parts = ready(build_remote(remote_config(fresh_cluster, retry_backoff_s=0.2, upload_batch_chunks=4)))
    raw = _raw(fresh_cluster)
    try:
        chunks = [make_chunk(rng, ns, tokens=4) for _ in range(60)]
        victim = fresh_cluster.masters()[0]
        for i, c in enumerate(chunks):
            assert parts.uploader.submit(*c)
            if i == 20:
                fresh_cluster.kill(victim)          # mid-stream: the uploader is busy
        t0 = time.monotonic()
        refs = parts.tier.get_many([c[0] for c in chunks])  # reads during the outage
        assert time.monotonic() - t0 < DEADLINE_S
        for ref, c in zip(refs, chunks):
            assert ref is None or bytes(ref.view) == c[2].tobytes()
        fresh_cluster.wait_ok([p for p in fresh_cluster.ports if p != victim], timeout_s=30)
        assert parts.uploader.flush(timeout_s=60)
        present = parts.tier.contains_many([c[0] for c in chunks])
        assert all(present), f"{present.count(False)} chunks never uploaded"
        # Right after the failover a read may still be a miss (a deadline or a stale slot map
        # turns into None, never an error); within a few seconds every chunk is served, intact.
        deadline = time.monotonic() + 15
        refs = parts.tier.get_many([c[0] for c in chunks])
        while any(r is None for r in refs) and time.monotonic() < deadline:
            time.sleep(0.2)
            refs = parts.tier.get_many([c[0] for c in chunks])
        for ref, c in zip(refs, chunks):
            assert ref is not None and bytes(ref.view) == c[2].tobytes()
        st = parts.uploader.stats()
        assert st.uploaded == len(chunks) and st.skipped_queue_full == 0
    finally:
        raw.close()
        parts.close()
