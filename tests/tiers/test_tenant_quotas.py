"""Per-tenant byte quotas charged in the tiers (``quotas.max_dram_bytes``, ``max_disk_bytes``,
``max_reserved_bytes``): real DRAM arena, real disk directory, the daemon's ledger.

Rule in a chain (docs/security.md, "Tier byte quotas"): a tenant at its DRAM quota evicts its
own chunks first; when it cannot (its chunks are pinned or leased), a MEMORY put lands in
the next tier that takes it (the chain's spill), and with no such tier it is refused with
RESOURCE_EXHAUSTED naming the quota.
"""

from __future__ import annotations

import dataclasses

import pytest

from kvstore import config as cfg
from kvstore.domain.errors import InvalidArgument, ResourceExhausted
from kvstore.domain.results import PutResult
from kvstore.domain.types import Durability, Medium
from kvstore.quotas import QuotaLedger, Resource, TierAccount
from kvstore.store import Store
from kvstore.tiers.base import PinTable
from kvstore.tiers.dram import DramTier

from .conftest import CHUNK_BYTES, PAGE_BYTES, TEST_NAMESPACE, chain_config, dram_config, make_chunk

MEM = Durability.MEMORY
#: One test chunk's DRAM extent (what the DRAM tier charges).
EXTENT = -(-CHUNK_BYTES // PAGE_BYTES) * PAGE_BYTES


def _config(tmp_path, quotas: dict, chain: dict | None = None, capacity: int = 32 * EXTENT) -> cfg.Config:
    base = chain_config(tmp_path / "disk", capacity=capacity, chain=chain)
    return base.model_copy(update={"quotas": cfg.QuotaConfig(**quotas)})


@pytest.fixture
def open_store(tmp_path, clock):
    made = []

    def _open(quotas: dict, chain: dict | None = None):
        s = Store.open(_config(tmp_path, quotas, chain), clock)
        made.append(s)
        nids = {t: s.namespaces.register(dataclasses.replace(TEST_NAMESPACE, tenant=t)).namespace_id
                for t in ("alice", "bob")}
        return s, nids
    yield _open
    for s in made:
        s.close()


def _put(store, rng, nid, clock=None):
    cid, meta, payload = make_chunk(rng, nid)
    if clock is not None:
        clock.now += 1      # distinct recency
    return cid, store.put(cid, meta, memoryview(payload).cast("B"), MEM)


def test_dram_quota_evicts_the_tenants_own_chunks_never_anothers(open_store, rng, clock):
    store, nids = open_store({"max_dram_bytes": 3 * EXTENT}, chain={"tiers": ["dram"]})
    bobs = [_put(store, rng, nids["bob"], clock)[0] for _ in range(2)]
    alices = []
    for _ in range(6):
        cid, r = _put(store, rng, nids["alice"], clock)
        assert r is PutResult.STORED
        alices.append(cid)
    assert store.limits.held("alice", Resource.DRAM_BYTES) == 3 * EXTENT
    assert store.locate(alices) == [None] * 3 + [Medium.DRAM] * 3      # its oldest went first
    assert store.locate(bobs) == [Medium.DRAM] * 2                      # bob's untouched
    assert store.limits.held("bob", Resource.DRAM_BYTES) == 2 * EXTENT
    store.delete(alices[3:])
    store.clear_namespace(nids["bob"])
    assert store.limits.held("alice", Resource.DRAM_BYTES) == 0
    assert store.limits.held("bob", Resource.DRAM_BYTES) == 0


def test_a_put_the_dram_quota_refuses_lands_in_the_next_tier(open_store, rng, clock):
    store, nids = open_store({"max_dram_bytes": 2 * EXTENT})
    held = [_put(store, rng, nids["alice"], clock)[0] for _ in range(2)]
    assert store.pin(held, ttl_s=60) == 2          # its own chunks cannot be evicted now
    cid, r = _put(store, rng, nids["alice"], clock)
    assert r is PutResult.STORED
    store.flush()
    assert store.locate([cid]) == [Medium.DISK]     # spilled, charged to the disk quota
    assert store.limits.held("alice", Resource.DRAM_BYTES) == 2 * EXTENT
    assert store.limits.held("alice", Resource.DISK_BYTES) > 0
    _, r = _put(store, rng, nids["bob"], clock)     # another tenant is not affected
    assert r is PutResult.STORED


def test_without_a_next_tier_the_put_is_refused_naming_the_quota(open_store, rng, clock):
    store, nids = open_store({"max_dram_bytes": 2 * EXTENT}, chain={"tiers": ["dram"]})
    held = [_put(store, rng, nids["alice"], clock)[0] for _ in range(2)]
    store.pin(held, ttl_s=60)
    with pytest.raises(ResourceExhausted, match=r"quotas\.max_dram_bytes=") as e:
        _put(store, rng, nids["alice"], clock)
    assert "alice" in str(e.value)
    assert store.limits.held("alice", Resource.DRAM_BYTES) == 2 * EXTENT   # nothing counted for the refusal
    assert _put(store, rng, nids["bob"], clock)[1] is PutResult.STORED


def test_disk_quota_evicts_own_chunks_and_is_rebuilt_on_restart(tmp_path, rng, clock):
    conf = _config(tmp_path, {"max_disk_bytes": 3 * (CHUNK_BYTES + 4096)}, chain={"tiers": ["disk"]})
    store = Store.open(conf, clock)
    try:
        nids = {t: store.namespaces.register(dataclasses.replace(TEST_NAMESPACE, tenant=t)).namespace_id
                for t in ("alice", "bob")}
        bob = _put(store, rng, nids["bob"], clock)[0]
        alices = [_put(store, rng, nids["alice"], clock)[0] for _ in range(5)]
        got = store.limits.held("alice", Resource.DISK_BYTES)
        assert 0 < got <= 3 * (CHUNK_BYTES + 4096)
        assert store.locate(alices[:2]) == [None, None] and store.locate([bob]) == [Medium.DISK]
        bob_bytes = store.limits.held("bob", Resource.DISK_BYTES)
    finally:
        store.close()
    store = Store.open(conf, clock)     # a restart: usage comes back from the index
    try:
        assert store.limits.held("alice", Resource.DISK_BYTES) == got
        assert store.limits.held("bob", Resource.DISK_BYTES) == bob_bytes
        store.delete([bob])
        assert store.limits.held("bob", Resource.DISK_BYTES) == 0
    finally:
        store.close()


def test_reservations_are_charged_by_bytes_then_moved_to_dram_at_commit(rng, clock):
    nid = bytes(range(32))
    ledger = QuotaLedger(cfg.QuotaConfig(max_reserved_bytes=2 * EXTENT, max_dram_bytes=3 * EXTENT))
    pins = PinTable(clock)
    tier = DramTier(dram_config(capacity=16 * EXTENT), pins, clock,
                    account=TierAccount(ledger, Resource.DRAM_BYTES, lambda ns: "alice"))
    try:
        cids = [make_chunk(rng, nid) for _ in range(4)]
        r1 = tier.reserve(cids[0][0], CHUNK_BYTES, same_host=True)
        r2 = tier.reserve(cids[1][0], CHUNK_BYTES, same_host=True)
        with pytest.raises(ResourceExhausted, match=r"quotas\.max_reserved_bytes="):
            tier.reserve(cids[2][0], CHUNK_BYTES, same_host=True)
        assert ledger.held("alice", Resource.RESERVED_BYTES) == 2 * EXTENT
        tier.abort(r2)                                       # an aborted reservation gives its bytes back
        assert ledger.held("alice", Resource.RESERVED_BYTES) == EXTENT
        r1.view[:] = memoryview(cids[0][2]).cast("B")
        tier.commit(r1, cids[0][1])
        assert ledger.held("alice", Resource.RESERVED_BYTES) == 0
        assert ledger.held("alice", Resource.DRAM_BYTES) == EXTENT
        # Commit over the DRAM quota with nothing of its own to evict: refused, still reserved.
        for c in cids[1:3]:
            assert tier.put(c[0], c[1], memoryview(c[2]).cast("B"))
        for c in cids[:3]:
            pins.pin(c[0], 60)
        r4 = tier.reserve(cids[3][0], CHUNK_BYTES, same_host=True)
        with pytest.raises(ResourceExhausted, match=r"quotas\.max_dram_bytes="):
            tier.commit(r4, cids[3][1])
        assert not tier.contains(cids[3][0])
        tier.abort(r4)
        assert ledger.held("alice", Resource.RESERVED_BYTES) == 0
        assert ledger.held("alice", Resource.DRAM_BYTES) == 3 * EXTENT
        for c in cids[:3]:
            pins.unpin(c[0])
        tier.delete(cids[0][0])
        with tier.get(cids[1][0]) as ref:                   # a leased chunk stays charged until freed
            tier.delete(cids[1][0])
            assert ledger.held("alice", Resource.DRAM_BYTES) == 2 * EXTENT
            assert ref.view.nbytes == CHUNK_BYTES
        assert ledger.held("alice", Resource.DRAM_BYTES) == EXTENT
    finally:
        tier.close()


def test_the_remote_tier_takes_its_quota_from_the_ledger():
    from kvstore.tiers.registry import BuildContext
    ledger = QuotaLedger(cfg.QuotaConfig(max_remote_bytes=5000),
                         {"vip": cfg.TenantQuotas(max_remote_bytes=10**9)})
    ctx = BuildContext(cfg.Config(), PinTable(lambda: 0.0), lambda: 0.0, quotas=ledger)
    assert ctx.quotas.limits("alice").limit(Resource.REMOTE_BYTES) == 5000
    assert ctx.quotas.limits("vip").limit(Resource.REMOTE_BYTES) == 10**9


@pytest.mark.parametrize("old,new", [
    ("server.max_pin_ttl_s=5", "quotas.max_pin_ttl_s"),
    ("server.max_pinned_bytes_per_tenant=1MiB", "quotas.max_pinned_bytes"),
    ("server.max_open_leases_per_tenant=3", "quotas.max_open_leases"),
    ("server.max_open_reservations_per_tenant=3", "quotas.max_open_reservations"),
    ("remote.tenant_quota_bytes=1GiB", "quotas.max_remote_bytes"),
])
def test_an_old_key_says_where_it_moved(old, new):
    with pytest.raises(InvalidArgument, match=f"moved to {new}"):
        cfg.load_config(env={}, overrides=[old])
