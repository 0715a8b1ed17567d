"""Tenant isolation: keys are salted with the cluster secret; tenants never see each other."""

from __future__ import annotations

from kvstore.types import ChunkId, DType
from kvstore.tiers.remote import RemoteTier
from kvstore.tiers.remote.keys import RemoteKeys
from kvstore_wire.keys import Namespace

from .conftest import make_chunk, remote_config, ready


def _ns(tenant: str) -> bytes:
    return Namespace("smollm2-135m", DType.FLOAT16, 30, 3, 64, chunk_tokens=16, tenant=tenant).namespace_id


def test_tenants_never_see_each_other(redis_cluster, rng):
    ns_x, ns_y = _ns("tenant-x"), _ns("tenant-y")
    replica_a = ready(RemoteTier(remote_config(redis_cluster)))
    replica_b = ready(RemoteTier(remote_config(redis_cluster)))
    try:
        cid, meta, payload = make_chunk(rng, ns_x)
        key = cid[32:]
        assert replica_a.put(cid, meta, payload)
        assert replica_b.get(cid) is not None          # same tenant, other replica: a hit
        same_tokens_y = ChunkId(ns_y + key)            # Y asks for the very same key bytes
        assert replica_b.get(same_tokens_y) is None
        assert not replica_b.contains(same_tokens_y)
        assert replica_b.longest_prefix([same_tokens_y]) == 0
        assert list(replica_b.scan(ns_y)) == []
    finally:
        replica_a.close()
        replica_b.close()


def test_keys_are_not_computable_without_the_secret(rng):
    ns = _ns("tenant-x")
    cid = ChunkId(ns + rng.bytes(32))
    ours = RemoteKeys("cluster-secret-0123456789", "kvs")
    guess = RemoteKeys("another-secret-0123456789", "kvs")
    assert ours.chunk(cid) != guess.chunk(cid)
    assert ns.hex().encode() not in ours.chunk(cid)
    assert ours.chunk(cid) != RemoteKeys("cluster-secret-0123456789", "kvs").chunk(ChunkId(_ns("tenant-y") + cid[32:]))


def test_a_sidecar_with_another_secret_misses(redis_cluster, rng, ns):
    a = ready(RemoteTier(remote_config(redis_cluster)))
    b = ready(RemoteTier(remote_config(redis_cluster, key_secret="some-other-secret-xyz")))
    try:
        cid, meta, payload = make_chunk(rng, ns, tokens=1)
        assert a.put(cid, meta, payload)
        assert b.get(cid) is None
    finally:
        a.close()
        b.close()


def test_quota_skips_and_delete_refunds(redis_cluster, rng, ns):
    from kvstore.tiers.remote import StoreOutcome
    one = make_chunk(rng, ns, tokens=4)
    size = one[2].nbytes + 104
    # The quota is the daemon ledger's quotas.max_remote_bytes (per-token overrides included).
    quota = {"small": 2 * size + size // 2, "big": 10**9}
    tier = ready(RemoteTier(remote_config(redis_cluster), quota_of=lambda t: quota.get(t, 10**9),
                            tenant_of=lambda n: "small" if n == ns else "big"))
    try:
        chunks = [one] + [make_chunk(rng, ns, tokens=4) for _ in range(3)]
        outcomes = [tier.store(c, m, p) for c, m, p in chunks]
        assert outcomes == [StoreOutcome.STORED] * 2 + [StoreOutcome.OVER_QUOTA] * 2
        assert tier.remote_stats().quota_rejections == 2
        assert not tier.contains(chunks[2][0])
        other = make_chunk(rng, rng.bytes(32), tokens=4)       # another tenant is unaffected
        assert tier.store(*other) is StoreOutcome.STORED
        assert tier.delete(chunks[0][0])                        # bytes come back to the tenant
        assert tier.store(*chunks[2]) is StoreOutcome.STORED
    finally:
        tier.close()
