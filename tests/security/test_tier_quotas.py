"""Per-tenant byte quotas in the tiers, against a real daemon with two tokens (issue 8).

The property: a tenant exhausting every quota it has (DRAM bytes, disk bytes, reserved bytes
and reservations, pins, leases) never makes another tenant's request fail or wait: the
victim's puts and gets keep working, over the stream and the same-host path, with the
latency they had before. Over its own quotas the hostile tenant gets RESOURCE_EXHAUSTED
naming the quota's key (the per-token key when its token overrides it), or its own chunks
are evicted (DRAM, disk), never another tenant's.
"""

from __future__ import annotations

import statistics
import time

import grpc
import numpy as np
import pytest

from kvstore_client import KVStoreClient, Namespace
from kvstore_testing.data import ALICE_TOKEN, BOB_TOKEN
from kvstore_testing.daemon import spawn_daemon
from kvstore_wire._proto.kvstore.v1 import local_pb2, local_pb2_grpc
from kvstore_wire.types import Tier

from .conftest import kv, md

VICTIM, MALLORY = ALICE_TOKEN, BOB_TOKEN
#: 64 KiB chunks: 4 layers x (K, V) x 64 tokens x 2 heads x 32 dims x fp16.
NS = dict(model="tier-quotas", dtype="float16", num_layers=4, num_kv_heads=2, head_dim=32, chunk_tokens=64)
CHUNK_BYTES = 4 * 2 * 64 * 2 * 32 * 2
DRAM_CHUNKS, DISK_CHUNKS, RESERVED_CHUNKS, PINNED_CHUNKS, LEASES = 8, 16, 4, 2, 4
#: What the hostile tenant stores: more than the whole DRAM arena (16 MiB = 256 chunks).
FLOOD_CHUNKS = 320
SETTINGS = [
    "dram.capacity_bytes=16MiB", "disk.capacity_bytes=64MiB", 'metrics.listen=""', "server.worker_threads=4",
    "server.shutdown_grace_s=1", "server.lease_ttl_s=30", "dram.page_bytes=64KiB",
    f"quotas.max_dram_bytes={DRAM_CHUNKS * CHUNK_BYTES}",
    f"quotas.max_disk_bytes={DISK_CHUNKS * (CHUNK_BYTES + 4096)}",
    f"quotas.max_pinned_bytes={PINNED_CHUNKS * CHUNK_BYTES}", f"quotas.max_open_leases={LEASES}",
]


def _spawn(base):
    tokens = base / "tokens.toml"
    tokens.write_text(
        "[tokens]\n"
        f'"{VICTIM}" = {{ tenant = "alice", local_path = true, '     # room for everything it stores here
        f'quotas = {{ max_dram_bytes = "64MiB", max_disk_bytes = "64MiB" }} }}\n'
        f'"{MALLORY}" = {{ tenant = "bob", local_path = true, '
        f'quotas = {{ max_reserved_bytes = {RESERVED_CHUNKS * CHUNK_BYTES} }} }}\n')
    return spawn_daemon(base_dir=base, settings=[*SETTINGS, f'auth.tokens_file="{tokens}"'])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = _spawn(tmp_path_factory.mktemp("tier-quotas"))
    yield d
    d.stop()


@pytest.fixture
def fresh_daemon(tmp_path):
    """The same daemon with nothing held by earlier tests (their leases and pins)."""
    d = _spawn(tmp_path)
    yield d
    d.stop()


def client(daemon, token: str, model: str, local: bool) -> KVStoreClient:
    return KVStoreClient(daemon.addr, Namespace(**{**NS, "model": model}), token=token, local=local)


def reserve(stub, c: KVStoreClient, keys, token: str):
    return stub.ReserveWrite(local_pb2.ReserveWriteRequest(namespace_id=c.namespace_id, chunks=[
        local_pb2.ChunkToWrite(key=k, num_tokens=64, encoding=1, payload_bytes=CHUNK_BYTES) for k in keys]),
        metadata=md(token), timeout=10)


def victim_round(v_stream: KVStoreClient, v_local: KVStoreClient, base: int, n: int = 6) -> list[float]:
    """Stores and reads back ``n`` chunks on each path; every call must succeed. Latencies (s)."""
    lat = []
    for i, c in enumerate((v_stream, v_local)):
        for j in range(n):
            toks = list(range(base + (i * n + j) * 64, base + (i * n + j + 1) * 64))
            data = kv(64, base + i * n + j)
            t0 = time.perf_counter()
            assert c.store(toks, data) == 1
            got, arr = c.retrieve(toks)
            lat.append(time.perf_counter() - t0)
            assert got == 64 and np.array_equal(np.asarray(arr), data)
    return lat


def test_one_tenant_exhausting_every_quota_never_fails_or_slows_another(daemon):
    with client(daemon, VICTIM, "v-stream", local=False) as vs, client(daemon, VICTIM, "v-local", local=True) as vl, \
            client(daemon, MALLORY, "m-stream", local=False) as ms, \
            client(daemon, MALLORY, "m-local", local=True) as ml, grpc.insecure_channel(daemon.addr) as ch:
        stub = local_pb2_grpc.LocalDataStub(ch)
        victim_round(vs, vl, 10_000, n=2)                    # warm up both paths
        before = victim_round(vs, vl, 20_000)
        kept = list(range(64 * 4))
        assert vs.store(kept, kv(len(kept), 5)) == 4         # the victim's chunks already cached

        # 1. DRAM and disk bytes: far more than its quotas. Its own chunks are evicted, its puts work.
        #    More than the whole 16 MiB arena: without the DRAM quota, the victim's chunks would be
        #    evicted from DRAM by policy; with it, the flood only ever evicts the flood.
        flood = list(range(100_000, 100_000 + 64 * FLOOD_CHUNKS))
        for k in range(0, len(flood), 64 * 8):
            assert ms.store(flood[k:k + 64 * 8], kv(64 * 8, k)) == 8
        found = vs.lookup(kept)
        assert found.matched_chunks == 4 and set(found.tiers) == {Tier.DRAM}, found
        # 2. Pins: its whole quota, then one more is refused naming the key.
        pin = list(range(64 * (PINNED_CHUNKS + 1)))
        assert ms.store(pin, kv(len(pin), 3)) == PINNED_CHUNKS + 1
        assert ms.lookup(pin[:64 * PINNED_CHUNKS], pin_ttl_s=60).matched_chunks == PINNED_CHUNKS
        with pytest.raises(Exception, match="quotas.max_pinned_bytes"):
            ms.lookup(pin, pin_ttl_s=60)
        # 3. Leases: every one it may open.
        toks = list(range(64))
        ms.store(toks, kv(64, 4))
        req = local_pb2.LeaseReadRequest(namespace_id=ms.namespace_id, keys=ms.keys(toks))
        leases = [stub.LeaseRead(req, metadata=md(MALLORY), timeout=10).lease_id for _ in range(LEASES)]
        with pytest.raises(grpc.RpcError) as e:
            stub.LeaseRead(req, metadata=md(MALLORY), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "quotas.max_open_leases" in e.value.details()
        # 4. Reserved bytes (its token overrides the quota): held uncommitted, then one more is refused.
        keys = ml.keys(list(range(500_000, 500_000 + 64 * (RESERVED_CHUNKS + 1))))
        held = reserve(stub, ml, keys[:RESERVED_CHUNKS], MALLORY)
        with pytest.raises(grpc.RpcError) as e:
            reserve(stub, ml, keys[RESERVED_CHUNKS:], MALLORY)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "auth.tokens.<token>.quotas.max_reserved_bytes" in e.value.details(), e.value.details()

        # The victim, while all of that is held: every request works, with its usual latency.
        after = victim_round(vs, vl, 30_000)
        assert vs.retrieve(kept)[0] == len(kept)
        assert statistics.median(after) < 3 * statistics.median(before) + 0.05, (before, after)
        assert max(after) < 2.0, after

        stub.Release(local_pb2.ReleaseRequest(lease_ids=leases + [held.lease_id]), metadata=md(MALLORY), timeout=10)
        # Given back: the hostile tenant can reserve again.
        again = reserve(stub, ml, keys[:RESERVED_CHUNKS], MALLORY)
        stub.Release(local_pb2.ReleaseRequest(lease_ids=[again.lease_id]), metadata=md(MALLORY), timeout=10)



def _counting(c: KVStoreClient) -> dict[str, int]:
    """Counts the client's calls of each RPC (wrapping its bound stubs)."""
    calls: dict[str, int] = {}
    for name, fn in list(c._rpc.items()):
        def counted(*a, _fn=fn, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **kw)
        c._rpc[name] = counted
    return calls


def test_a_same_host_store_over_the_reserved_bytes_quota_goes_in_windows(fresh_daemon):
    """A store bigger than the tenant's reserved-bytes share is not an error for the engine
    and keeps the same-host path: refused as one reservation, the client reserves and commits
    halves, one after the other (no Put stream)."""
    with client(fresh_daemon, MALLORY, "big-store", local=True) as m:
        n = RESERVED_CHUNKS * 2
        toks = list(range(64 * n))
        data = kv(len(toks), 21)
        calls = _counting(m)
        assert m.store(toks, data) == n
        assert calls.get("put", 0) == 0, calls
        assert calls["reserve"] >= 3 and calls["commit"] >= 2, calls
        got, arr = m.retrieve(toks)
        assert got == len(toks) and np.array_equal(np.asarray(arr), data)


def test_a_chunk_bigger_than_the_reserved_bytes_quota_is_streamed_instead(daemon):
    """One chunk over the tenant's whole reserved-bytes quota: the client streams it (the
    stream path queues on the in-flight budget)."""
    chunk_tokens = 64 * (RESERVED_CHUNKS + 1)      # 320 KiB: over the 256 KiB, within the DRAM quota
    with KVStoreClient(daemon.addr, Namespace(**{**NS, "model": "big-chunk", "chunk_tokens": chunk_tokens}),
                       token=MALLORY, local=True) as m:
        toks = list(range(chunk_tokens))
        data = kv(len(toks), 22)
        calls = _counting(m)
        assert m.store(toks, data) == 1
        assert calls.get("put", 0) == 1, calls
        got, arr = m.retrieve(toks)
        assert got == len(toks) and np.array_equal(np.asarray(arr), data)


def test_a_store_refused_part_way_counts_every_chunk_it_stored(daemon):
    """After the hostile tests above the tenant's DRAM quota is held by its own leased and
    pinned chunks, so some same-host commits are refused and the rest is streamed: the store
    still reports every chunk it newly stored, whichever path took it, and all read back."""
    with client(daemon, MALLORY, "big-store-after-flood", local=True) as m:
        n = RESERVED_CHUNKS * 2
        toks = list(range(64 * n))
        data = kv(len(toks), 23)
        assert m.store(toks, data) == n
        got, arr = m.retrieve(toks)
        assert got == len(toks) and np.array_equal(np.asarray(arr), data)
