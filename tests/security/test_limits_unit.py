"""The small parts behind admission control and per-tenant limits, without a daemon."""

from __future__ import annotations

import asyncio

import pytest

from kvstore.domain.errors import ResourceExhausted
from kvstore.server.admission import InflightBudget, StreamGate
from kvstore.config import QuotaConfig
from kvstore.quotas import QuotaLedger
from kvstore.store.limits import PinAccount, Resource


def test_budget_waits_bounded_then_names_its_key_and_serves_waiters_in_order():
    async def go():
        b = InflightBudget(100, wait_s=0.2)
        await b.acquire(80)
        with pytest.raises(ResourceExhausted, match="quotas.daemon_max_inflight_request_bytes"):
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


def test_budget_counts_each_tenant_against_its_own_quota_first():
    async def go():
        ledger = QuotaLedger(QuotaConfig(max_inflight_request_bytes=60))
        b = InflightBudget(100, wait_s=0.2, ledger=ledger)
        await b.acquire(50, "a")
        with pytest.raises(ResourceExhausted, match="quotas.max_inflight_request_bytes=60"):
            await b.acquire(20, "a")                 # over its own quota: refused at once, no wait
        await b.acquire(40, "b")                     # another tenant still has room
        assert b.used_bytes == 90 and ledger.held("a", Resource.INFLIGHT_REQUEST_BYTES) == 50
        with pytest.raises(ResourceExhausted, match="quotas.daemon_max_inflight_request_bytes"):
            await b.acquire(20, "c")                 # daemon-wide: waited, then refused, nothing kept
        assert ledger.held("c", Resource.INFLIGHT_REQUEST_BYTES) == 0
        b.release(50, "a")
        b.release(40, "b")
        assert b.used_bytes == 0 and ledger.held("a", Resource.INFLIGHT_REQUEST_BYTES) == 0
    asyncio.run(go())


def test_stream_gate_refuses_one_more():
    g = StreamGate(1)
    with g.enter():
        with pytest.raises(ResourceExhausted, match="server.max_concurrent_streams"):
            g.enter()
    with g.enter():
        assert g.open_streams == 1


def test_pin_account_counts_new_pins_once_and_releases_expired_ones():
    now = [1000.0]
    c = QuotaLedger(QuotaConfig(max_pinned_bytes=300))
    pins = PinAccount(c, clock=lambda: now[0])
    pins.charge("t", [b"a", b"b"], 10, 100)
    pins.charge("t", [b"a", b"b"], 10, 100)          # re-pinning is free
    assert c.held("t", Resource.PINNED_BYTES) == 200
    with pytest.raises(ResourceExhausted, match="quotas.max_pinned_bytes=300"):
        pins.charge("t", [b"c", b"d"], 10, 100)
    assert c.held("t", Resource.PINNED_BYTES) == 200   # nothing counted for the refused call
    now[0] += 11                                      # both pins expired
    pins.charge("t", [b"c", b"d", b"e"], 10, 100)
    assert c.held("t", Resource.PINNED_BYTES) == 300
