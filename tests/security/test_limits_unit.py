"""The small parts behind admission control and per-tenant limits, without a daemon."""

from __future__ import annotations

import asyncio

import pytest

from kvstore.domain.errors import ResourceExhausted
from kvstore.server.admission import InflightBudget, StreamGate
from kvstore.store.limits import Limit, PinAccount, Resource, TenantCounters


def test_budget_waits_bounded_then_names_its_key_and_serves_waiters_in_order():
    async def go():
        b = InflightBudget(100, wait_s=0.2)
        await b.acquire(80)
        with pytest.raises(ResourceExhausted, match="server.max_inflight_bytes"):
            await b.acquire(30)                      # nothing freed in time
        assert b.used_bytes == 80
        first = asyncio.ensure_future(b.acquire(50))
        second = asyncio.ensure_future(b.acquire(10))
        await asyncio.sleep(0.01)
        assert not first.done() and not second.done()   # the small one does not jump the queue
        b.release(80)
        await asyncio.gather(first, second)
        assert b.used_bytes == 60
        b.release(60)
        assert b.used_bytes == 0
    asyncio.run(go())


def test_stream_gate_refuses_one_more():
    g = StreamGate(1)
    with g.enter():
        with pytest.raises(ResourceExhausted, match="server.max_concurrent_streams"):
            g.enter()
    with g.enter():
        assert g.open_streams == 1


def test_tenant_counters_are_per_tenant_and_name_the_key():
    c = TenantCounters({Resource.OPEN_LEASES: Limit(2, "server.max_open_leases_per_tenant", "leases")})
    c.acquire("a", Resource.OPEN_LEASES, 2)
    with pytest.raises(ResourceExhausted, match="server.max_open_leases_per_tenant=2"):
        c.acquire("a", Resource.OPEN_LEASES, 1)
    c.acquire("b", Resource.OPEN_LEASES, 2)          # another tenant is not affected
    c.release("a", Resource.OPEN_LEASES, 2)
    assert c.usage("a") == {} and c.usage("b") == {Resource.OPEN_LEASES: 2}


def test_pin_account_counts_new_pins_once_and_releases_expired_ones():
    now = [1000.0]
    c = TenantCounters({Resource.PINNED_BYTES: Limit(300, "server.max_pinned_bytes_per_tenant", "bytes pinned")})
    pins = PinAccount(c, clock=lambda: now[0])
    pins.charge("t", [b"a", b"b"], 10, 100)
    pins.charge("t", [b"a", b"b"], 10, 100)          # re-pinning is free
    assert c.usage("t") == {Resource.PINNED_BYTES: 200}
    with pytest.raises(ResourceExhausted, match="server.max_pinned_bytes_per_tenant"):
        pins.charge("t", [b"c", b"d"], 10, 100)
    assert c.usage("t") == {Resource.PINNED_BYTES: 200}   # nothing counted for the refused call
    now[0] += 11                                      # both pins expired
    pins.charge("t", [b"c", b"d", b"e"], 10, 100)
    assert c.usage("t") == {Resource.PINNED_BYTES: 300}
