"""The tier contract, run against every tier, wrapper and chain composition (``any_tier``)."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.domain.errors import ResourceExhausted

from .conftest import BUDGET_BYTES, CHUNK_BYTES, make_chunk

#: Chunks that overfill the budget about three times.
OVERFILL_CHUNKS = 3 * BUDGET_BYTES // CHUNK_BYTES


def _fill(h, rng, n=OVERFILL_CHUNKS):
    out = []
    for _ in range(n):
        cid, meta, payload = make_chunk(rng)
        assert h.put(cid, meta, payload)
        out.append((cid, payload))
    h.settle()
    return out


def _read(h, cid) -> bytes | None:
    ref = h.get(cid)
    if ref is None:
        return None
    with ref:
        assert ref.view.readonly
        assert ref.meta.payload_bytes == len(ref.view)
        return bytes(ref.view)


def test_round_trip_is_bit_exact(any_tier, rng):
    chunks = [make_chunk(rng) for _ in range(4)]
    for cid, meta, payload in chunks:
        assert any_tier.put(cid, meta, payload)
    any_tier.settle()
    for cid, meta, payload in chunks:
        got = _read(any_tier, cid)
        assert got == payload.tobytes()
        np.testing.assert_array_equal(np.frombuffer(got, np.float16).reshape(payload.shape), payload)


def test_odd_sizes_round_trip(any_tier, rng):
    import kvstore_native as native
    from kvstore.domain.types import ChunkId, ChunkMeta, Encoding
    for n in (0, 1, 4095, 4096, 4097, 100_003):
        data = rng.bytes(n)
        cid = ChunkId(bytes(32) + rng.bytes(32))
        assert any_tier.put(cid, ChunkMeta(1, Encoding.CODEC, n, native.crc32c(data)), data)
        assert _read(any_tier, cid) == data


def test_chunks_are_immutable(any_tier, rng):
    cid, meta, payload = make_chunk(rng)
    assert any_tier.put(cid, meta, payload)
    _, meta2, other = make_chunk(rng)
    assert not any_tier.put(cid, meta2, other)
    any_tier.settle()
    assert _read(any_tier, cid) == payload.tobytes()


def test_contains_and_delete(any_tier, rng):
    cid, meta, payload = make_chunk(rng)
    assert not any_tier.contains(cid)
    assert _read(any_tier, cid) is None
    any_tier.put(cid, meta, payload)
    any_tier.settle()
    assert any_tier.contains(cid)
    assert any_tier.delete(cid)
    assert not any_tier.contains(cid)
    assert _read(any_tier, cid) is None
    assert not any_tier.delete(cid)


def test_eviction_keeps_every_tier_within_budget(any_tier, rng):
    chunks = _fill(any_tier, rng)
    for used, capacity in any_tier.budgets():
        assert used <= capacity
    assert any_tier.evictions() > 0
    # The newest chunk is still there and intact.
    cid, payload = chunks[-1]
    assert _read(any_tier, cid) == payload.tobytes()


def test_pinned_chunks_survive_eviction(any_tier, rng):
    pinned = _fill(any_tier, rng, 2)
    for cid, _ in pinned:
        any_tier.pin(cid)
    _fill(any_tier, rng)
    for cid, payload in pinned:
        assert _read(any_tier, cid) == payload.tobytes()


def test_pin_ttl_expires(any_tier, rng, clock):
    (cid, payload), = _fill(any_tier, rng, 1)
    any_tier.pin(cid, ttl_s=10)
    _fill(any_tier, rng)
    any_tier.evict_all()
    assert any_tier.contains(cid)
    clock.now += 11
    any_tier.evict_all()
    assert not any_tier.contains(cid)


def test_leased_chunk_is_not_reused_while_held(any_tier, rng):
    (cid, payload), = _fill(any_tier, rng, 1)
    ref = any_tier.get(cid)
    assert ref is not None
    _fill(any_tier, rng)             # everything else churns through the budget
    any_tier.delete(cid)             # even a delete waits for the lease to end
    _fill(any_tier, rng)
    assert bytes(ref.view) == payload.tobytes()
    ref.release()
    assert len(ref.view) == 0
    for used, capacity in any_tier.budgets():
        assert used <= capacity


def test_resource_exhausted_when_everything_is_pinned(any_tier, rng):
    with pytest.raises(ResourceExhausted, match="unpin|capacity_bytes"):
        for _ in range(2 * OVERFILL_CHUNKS):
            cid, meta, payload = make_chunk(rng)
            any_tier.put(cid, meta, payload)
            any_tier.pin(cid)
            any_tier.settle()


def test_chunk_larger_than_the_tier_is_refused(any_tier, rng):
    # Twice the budget even raw; a codec tier's lossless encoding is still well above it.
    cid, meta, payload = make_chunk(rng, tokens=16 * 20)
    with pytest.raises(ResourceExhausted, match="capacity_bytes"):
        any_tier.put(cid, meta, payload)


def test_scan_and_prefix_delete(any_tier, rng):
    ns_a, ns_b = b"\xaa" * 32, b"\xbb" * 32
    a = [make_chunk(rng, ns_a) for _ in range(3)]
    b = [make_chunk(rng, ns_b) for _ in range(2)]
    for cid, meta, payload in a + b:
        any_tier.put(cid, meta, payload)
    any_tier.settle()
    assert any_tier.ids() == {c for c, _, _ in a + b}
    assert any_tier.delete_prefix(ns_a) == 3
    assert any_tier.ids() == {c for c, _, _ in b}
    for cid, _, payload in b:
        assert _read(any_tier, cid) == payload.tobytes()
