"""Two real daemons (two replicas, separate data dirs) sharing the test Redis Cluster through
the remote level of their chains: what A stores is a hit on B (bit-exact at the lossless
level); tenants never see each other across replicas; a cluster that is down or paused
makes B's requests misses within the deadline while the local tiers keep serving; a value
corrupted inside Redis is dropped."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import ExitStack

import numpy as np
import pytest

from kvstore_client import KVStoreClient
from kvstore_testing.data import kv_for, smol_ns, tokens_for
from kvstore_wire.types import Tier

from .replicas import (HIT_TIMEOUT_MS, MISS_BOUND_S, TOK_X, TOK_Y, UPLOAD_WAIT_S, replica, stats, uploads,
                       wait_uploaded)


@pytest.fixture(scope="module")
def replicas(redis_cluster, tmp_path_factory):
    """Replicas A and B, shared by this module's tests (each test has its own namespace). The
    hit tests get a generous deadline: on a loaded 2-core box a 500 ms call can miss, which is
    the designed behaviour but would make "is a hit" flaky."""
    tmp = tmp_path_factory.mktemp("replicas")
    with ExitStack() as st:
        a = st.enter_context(replica(redis_cluster, tmp, "a", timeout_ms=HIT_TIMEOUT_MS))
        b = st.enter_context(replica(redis_cluster, tmp, "b", timeout_ms=HIT_TIMEOUT_MS))
        yield a, b


def test_prefix_stored_on_a_is_a_bit_exact_hit_on_b(replicas, request):
    a, b = replicas
    ns = smol_ns(f"replicas-{request.node.name}")
    toks = tokens_for(3 * 256, seed=1)
    kv = kv_for(ns, 3 * 256, seed=1)
    before = uploads(a)
    with KVStoreClient(a.addr, ns, token=TOK_X) as ca:
        assert ca.store(toks, kv) == 3
        wait_uploaded(a, 3, before)
    with KVStoreClient(b.addr, ns, token=TOK_X, local=False) as cb:
        found = cb.lookup(toks)
        assert found.matched_chunks == 3
        # Promoted on B: the lookup already finds them in B's own DRAM.
        assert all(t == Tier.DRAM for t in found.tiers)
        n, out = cb.retrieve(toks)
        assert n == 3 * 256
        assert np.asarray(out).tobytes() == kv.tobytes()
        r = stats(b).remote
        assert r.hits >= 3 and r.level_decisions["fetch:lossless"] >= 3
    # kvctl shows the remote tier (human and --json).
    out = subprocess.run([sys.executable, "-m", "kvstore.cli.kvctl", "--addr", b.addr, "--token", TOK_X, "stats"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "remote:" in out.stdout and "uploads:" in out.stdout and "fetch:lossless" in out.stdout
    out = subprocess.run([sys.executable, "-m", "kvstore.cli.kvctl", "--addr", a.addr, "--token", TOK_X, "--json",
                          "status"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stats"]["remote"]["uploaded"] >= 3


def test_same_host_client_on_b_leases_remote_chunks(replicas, request):
    a, b = replicas
    ns = smol_ns(f"replicas-{request.node.name}")
    toks = tokens_for(2 * 256, seed=2)
    kv = kv_for(ns, 2 * 256, seed=2)
    before = uploads(a)
    with KVStoreClient(a.addr, ns, token=TOK_X) as ca:
        ca.store(toks, kv)
        wait_uploaded(a, 2, before)
    with KVStoreClient(b.addr, ns, token=TOK_X, local=True) as cb:
        n, out = cb.retrieve(toks)
        assert n == 2 * 256 and np.asarray(out).tobytes() == kv.tobytes()


def test_tenant_x_on_a_is_never_a_hit_for_tenant_y_on_b(replicas, request):
    a, b = replicas
    ns = smol_ns(f"replicas-{request.node.name}")
    toks = tokens_for(2 * 256, seed=3)
    before = uploads(a)
    with KVStoreClient(a.addr, ns, token=TOK_X) as ca:
        ca.store(toks, kv_for(ns, 2 * 256, seed=3))
        wait_uploaded(a, 2, before)
    with KVStoreClient(b.addr, ns, token=TOK_Y, local=False) as cy:
        assert cy.lookup(toks).matched_chunks == 0
        assert cy.retrieve(toks)[0] == 0
    with KVStoreClient(b.addr, ns, token=TOK_X, local=False) as cx:
        assert cx.lookup(toks).matched_chunks == 2, (stats(b).remote, b.log_tail())  # the right tenant: a hit


def test_remote_down_is_a_quick_miss_and_local_tiers_keep_serving(fresh_cluster, tmp_path, request):
    ns = smol_ns(f"replicas-{request.node.name}")
    with replica(fresh_cluster, tmp_path, "b") as b, KVStoreClient(b.addr, ns, token=TOK_X, local=False) as cb:
        local_toks = tokens_for(256, seed=4)
        kv = kv_for(ns, 256, seed=4)
        cb.store(local_toks, kv)
        for port in list(fresh_cluster.ports):   # partitioned: every node stops answering
            fresh_cluster.pause(port)
        try:
            t0 = time.monotonic()
            assert cb.lookup(tokens_for(2 * 256, seed=5)).matched_chunks == 0
            assert time.monotonic() - t0 < MISS_BOUND_S
            t0 = time.monotonic()
            assert cb.retrieve(tokens_for(256, seed=6))[0] == 0
            assert time.monotonic() - t0 < MISS_BOUND_S
            n, out = cb.retrieve(local_toks)        # local chunks still served
            assert n == 256 and np.asarray(out).tobytes() == kv.tobytes()
        finally:
            for port in list(fresh_cluster.ports):
                fresh_cluster.resume(port)
        fresh_cluster.stop()                     # entirely down
        t0 = time.monotonic()
        assert cb.lookup(tokens_for(2 * 256, seed=7)).matched_chunks == 0
        assert time.monotonic() - t0 < MISS_BOUND_S
        n, out = cb.retrieve(local_toks)
        assert n == 256 and np.asarray(out).tobytes() == kv.tobytes()
        assert cb.store(tokens_for(256, seed=8), kv) == 1   # puts still work (upload retried later)


def test_value_corrupted_in_redis_is_dropped(replicas, redis_cluster, request):
    a, b = replicas
    ns = smol_ns(f"replicas-{request.node.name}")
    toks = tokens_for(2 * 256, seed=9)
    before = uploads(a)
    with KVStoreClient(a.addr, ns, token=TOK_X) as ca:
        ca.store(toks, kv_for(ns, 2 * 256, seed=9))
        wait_uploaded(a, 2, before)
        key_of_second = ca.keys(toks)[1]
    flipped = _corrupt_one(redis_cluster, key_of_second.hex())
    assert flipped, "the second chunk's value was not found in Redis"
    with KVStoreClient(b.addr, ns, token=TOK_X, local=False) as cb:
        assert cb.lookup(toks).matched_chunks == 1   # the corrupt second chunk ends the prefix
        assert stats(b).remote.corrupt >= 1


def _corrupt_one(cluster, key_hex: str) -> bool:
    """Flips a payload byte of the stored value whose key ends with ``key_hex`` (any node)."""
    for port in cluster.masters():
        for k in cluster.cli(port, "--scan", "--pattern", f"*:{key_hex}").split():
            if k.endswith(":s"):
                continue
            cluster.cli(port, "SETRANGE", k, "200", "\x7f\x7f\x7f\x7f")
            return True
    return False


def test_kv_events_announce_dram_disk_and_remote(redis_cluster, tmp_path, request):
    """events.enabled: a router subscribed to the daemon sees BlockStored per medium (DRAM,
    then DISK by write-behind, REMOTE once uploaded), keyed by the chunk keys."""
    import msgpack
    import zmq

    from kvstore_testing.ports import free_port

    pub = free_port()
    ns = smol_ns(f"events-{request.node.name}")
    toks = tokens_for(256, seed=11)
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind(f"tcp://127.0.0.1:{pub}")   # the daemon's PUB connects to a non-wildcard address
    try:
        with replica(redis_cluster, tmp_path, "ev", "events.enabled=true", f'events.endpoint="tcp://127.0.0.1:{pub}"',
                     'events.replay_endpoint=""', "events.batch_interval_ms=20",
                     timeout_ms=HIT_TIMEOUT_MS) as d, KVStoreClient(d.addr, ns, token=TOK_X, local=False) as c:
            # A PUB drops what it sends before the connection is up: store a warm-up chunk
            # until its events arrive, then the one under test.
            warm, deadline = 0, time.monotonic() + UPLOAD_WAIT_S
            while not sub.poll(500) and time.monotonic() < deadline:
                warm += 1
                c.store(tokens_for(256, seed=1000 + warm), kv_for(ns, 256, seed=12))
            c.store(toks, kv_for(ns, 256, seed=11))
            key = c.keys(toks)[0]
            seen: set[str] = set()
            deadline = time.monotonic() + UPLOAD_WAIT_S
            while seen != {"DRAM", "DISK", "REMOTE"} and time.monotonic() < deadline:
                if not sub.poll(200):
                    continue
                topic, seq, payload = sub.recv_multipart()
                _ts, events, _rank = msgpack.unpackb(payload)
                for ev in events:
                    if ev[0] == "BlockStored" and key in ev[1]:
                        seen.add(ev[6])
            assert seen == {"DRAM", "DISK", "REMOTE"}
            assert stats(d).events.published_events > 0
    finally:
        sub.close(0)
