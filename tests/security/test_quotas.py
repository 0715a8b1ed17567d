"""The quota model (kvstore.quotas): limits, overrides, messages naming the config key."""

from __future__ import annotations

import threading

import pytest

from kvstore.config import AuthConfig, QuotaConfig, TenantQuotas, load_config
from kvstore.errors import Internal, InvalidArgument, ResourceExhausted
from kvstore.quotas import QuotaLedger, Resource, ledger_from_config, resolve_limits


def test_safe_defaults_bound_everything_unevictable():
    lim = resolve_limits(QuotaConfig())
    for r in (Resource.PINNED_BYTES, Resource.OPEN_LEASES, Resource.OPEN_RESERVATIONS, Resource.RESERVED_BYTES,
              Resource.CONCURRENT_STREAMS, Resource.NAMESPACES, Resource.INFLIGHT_REQUEST_BYTES):
        assert lim.limit(r) is not None and lim.limit(r) > 0, r
    assert lim.max_pin_ttl_s <= 24 * 3600


def test_acquire_release_and_message_names_quota():
    led = QuotaLedger(QuotaConfig(max_open_leases=64))
    for _ in range(64):
        led.acquire("bob", Resource.OPEN_LEASES)
    with pytest.raises(ResourceExhausted) as e:
        led.acquire("bob", Resource.OPEN_LEASES)
    msg = str(e.value)
    assert "tenant 'bob' holds 64 open leases" in msg and "quotas.max_open_leases=64" in msg
    led.acquire("alice", Resource.OPEN_LEASES)  # another tenant is unaffected
    assert led.usage("bob")[Resource.OPEN_LEASES] == 64
    led.release("bob", Resource.OPEN_LEASES, 64)
    assert led.usage("bob")[Resource.OPEN_LEASES] == 0
    with pytest.raises(Internal):
        led.release("bob", Resource.OPEN_LEASES)


def test_failed_acquire_counts_nothing():
    led = QuotaLedger(QuotaConfig(max_pinned_bytes=1000))
    led.acquire("t", Resource.PINNED_BYTES, 900)
    with pytest.raises(ResourceExhausted, match="quotas.max_pinned_bytes=1000"):
        led.acquire("t", Resource.PINNED_BYTES, 200)
    assert led.usage("t")[Resource.PINNED_BYTES] == 900


def test_unlimited_cache_bytes_still_counted():
    led = QuotaLedger(QuotaConfig())
    led.acquire("t", Resource.DRAM_BYTES, 1 << 40)
    assert led.usage("t")[Resource.DRAM_BYTES] == 1 << 40


def test_per_token_override_and_its_key():
    cfg = load_config(overrides=[
        'auth.tokens={"tok-aaaaaaaaaaaaaaaa" = {tenant = "big", quotas = {max_open_leases = 2}}, '
        '"tok-bbbbbbbbbbbbbbbb" = {tenant = "small"}}', "quotas.max_open_leases=1"])
    led = ledger_from_config(cfg.quotas, cfg.auth)
    led.acquire("big", Resource.OPEN_LEASES, 2)
    with pytest.raises(ResourceExhausted, match=r"auth\.tokens\.<token>\.quotas\.max_open_leases=2"):
        led.acquire("big", Resource.OPEN_LEASES)
    led.acquire("small", Resource.OPEN_LEASES)
    with pytest.raises(ResourceExhausted, match=r"quotas\.max_open_leases=1"):
        led.acquire("small", Resource.OPEN_LEASES)


def test_conflicting_overrides_of_one_tenant_are_refused():
    auth = AuthConfig(tokens={"tok-aaaaaaaaaaaaaaaa": {"tenant": "t", "quotas": {"max_namespaces": 1}},
                              "tok-bbbbbbbbbbbbbbbb": {"tenant": "t", "quotas": {"max_namespaces": 2}}})
    with pytest.raises(InvalidArgument, match="different quotas"):
        ledger_from_config(QuotaConfig(), auth)


def test_pin_ttl_clamp():
    led = QuotaLedger(QuotaConfig(max_pin_ttl_s=60), {"vip": TenantQuotas(max_pin_ttl_s=600)})
    assert led.clamp_pin_ttl_s("t", 2**32 - 1) == 60    # the century-long pin of finding 2
    assert led.clamp_pin_ttl_s("t", 0) == 60            # "until unpinned" is bounded too
    assert led.clamp_pin_ttl_s("t", 5) == 5
    assert led.clamp_pin_ttl_s("vip", 2**32 - 1) == 600
    with pytest.raises(InvalidArgument):
        led.clamp_pin_ttl_s("t", -1)


def test_thread_safe_counting():
    led = QuotaLedger(QuotaConfig(max_concurrent_streams=10**9))

    def work():
        for _ in range(5000):
            led.acquire("t", Resource.CONCURRENT_STREAMS)
            led.release("t", Resource.CONCURRENT_STREAMS)
            led.acquire("t", Resource.CONCURRENT_STREAMS)

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert led.usage("t")[Resource.CONCURRENT_STREAMS] == 20000
