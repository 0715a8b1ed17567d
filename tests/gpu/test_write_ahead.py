"""GPU stores through write-ahead reservations (``kvstore_client.gpu_pool``) against a real
daemon: chunks land bit-exact whether their extents came from the pool, from the unbound
reservation of the rest, or from keyed reservations when the pool is refused; stored chunks
are skipped without using a slot; a client killed holding pool leases leaks nothing past the
lease TTL; a daemon restart drops the old pool."""

import os
import subprocess
import sys
import time

import grpc
import pytest

from kvstore_client import KVStoreClient, Namespace
from kvstore_client import gpu as kgpu
from kvstore_testing.daemon import spawn_daemon
from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc

SMOL = dict(dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64)


def _kv(ns, chunks, seed=0):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    tdt = {"FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16}[ns.dtype.name]
    return torch.randn(ns.chunk_shape(ns.chunk_tokens * chunks), device="cuda", generator=g).to(tdt)


def _dram_used(addr: str) -> int:
    with grpc.insecure_channel(addr) as ch:
        stats = admin_pb2_grpc.AdminStub(ch).GetStats(admin_pb2.GetStatsRequest(), timeout=5)
    return next(t.used_bytes for t in stats.tiers if t.tier == 2)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = spawn_daemon(base_dir=tmp_path_factory.mktemp("wa"), settings=[
        "dram.capacity_bytes=2GiB", "disk.enabled=false", 'metrics.listen=""', "server.lease_ttl_s=4"])
    yield d
    d.close()


def _round_trip(c, tokens, kv):
    import torch

    out = torch.full_like(kv, float("nan"))
    assert kgpu.retrieve_into_cuda(c, tokens, out) == len(tokens)
    assert torch.equal(out.view(torch.int16), kv.view(torch.int16))


def test_stores_use_the_pool_and_land_bit_exact(big):
    ns = Namespace(model="test/wa-basic", **SMOL)
    chunks = 6
    with KVStoreClient(big.addr, ns) as c:
        gp = kgpu.GpuPath(c)
        c._gpu_path = gp
        first = _kv(ns, chunks, 1)
        t1 = list(range(ns.chunk_tokens * chunks))
        assert kgpu.store_cuda(c, t1, first) == chunks     # pool empty: the rest reserved unbound
        pool = gp._write_pool
        assert pool is not None and pool.target_chunks >= chunks
        deadline = time.monotonic() + 10
        while pool.ready_slots() < chunks and time.monotonic() < deadline:
            time.sleep(0.01)                                # refilled in the background
        assert pool.ready_slots() >= chunks
        taken = pool.taken_slots
        # A second call is served from the pool; so are calls that do not wait for commits.
        futs, sets = [], []
        for s in range(2, 6):
            kv = _kv(ns, chunks, s)
            toks = list(range(s * 10**6, s * 10**6 + ns.chunk_tokens * chunks))
            futs.append(kgpu.store_cuda(c, toks, kv, wait=False))
            sets.append((toks, kv))
        assert [f.result(timeout=60) for f in futs] == [chunks] * 4
        assert pool.taken_slots > taken
        _round_trip(c, t1, first)
        for toks, kv in sets:
            _round_trip(c, toks, kv)
        # Stored chunks are skipped (presence index) and take no slot.
        taken = pool.taken_slots
        assert kgpu.store_cuda(c, t1, first) == 0
        assert pool.taken_slots == taken
        # Half stored already: only the new half is copied and bound.
        mixed = _kv(ns, 2 * chunks, 9)
        mixed[:, :, : ns.chunk_tokens * chunks] = first
        t2 = t1 + list(range(7 * 10**6, 7 * 10**6 + ns.chunk_tokens * chunks))
        assert kgpu.store_cuda(c, t2, mixed) == chunks
        _round_trip(c, t2, mixed)
        gp.close()
        c._gpu_path = None


def test_a_store_commits_its_pool_slots_in_shrinking_groups(big):
    """One store into pool slots sends one CommitWrite per group of ``commit_groups`` (each
    after its own copies); every chunk lands bit-exact and is counted once, with or without
    waiting, and chunks already stored in the middle of a call are skipped."""
    from kvstore_client.gpu_state import commit_groups

    ns = Namespace(model="test/wa-groups", **SMOL)
    chunks = 12
    with KVStoreClient(big.addr, ns) as c:
        gp = kgpu.GpuPath(c)
        c._gpu_path = gp
        size = ns.chunk_bytes()
        gp.commit_tail_bytes = size          # groups of 6, 3, 2, 1 chunks
        sent = []
        inner = gp.client._commit

        def counting(req, **kw):
            sent.append(len(req.bindings))
            return inner(req, **kw)
        gp.client._commit = counting
        warm = _kv(ns, chunks, 20)
        assert kgpu.store_cuda(c, list(range(5 * 10**7, 5 * 10**7 + ns.chunk_tokens * chunks)), warm) == chunks
        pool = gp._write_pool
        deadline = time.monotonic() + 10
        while pool.ready_slots() < chunks and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.ready_slots() >= chunks
        gp.refill_after_commits = True
        for wait in (True, False):
            sent.clear()
            kv = _kv(ns, chunks, 21 + wait)
            toks = list(range((8 + wait) * 10**7, (8 + wait) * 10**7 + ns.chunk_tokens * chunks))
            got = kgpu.store_cuda(c, toks, kv, wait=wait)
            assert (got if wait else got.result(timeout=60)) == chunks
            assert sorted(sent, reverse=True) == [hi - lo for lo, hi in commit_groups(chunks, size, size)]
            _round_trip(c, toks, kv)
        # Chunks 3..5 stored already: the other 9 are copied and bound, in groups again.
        part = _kv(ns, chunks, 30)
        toks = list(range(10**8, 10**8 + ns.chunk_tokens * chunks))
        t0, t1 = 3 * ns.chunk_tokens, 6 * ns.chunk_tokens
        assert kgpu.store_cuda(c, toks[:t1], part[:, :, :t1].contiguous()) == 6
        c.delete(c.keys(toks[:t0]))
        sent.clear()
        assert kgpu.store_cuda(c, toks, part) == chunks - 3
        assert sum(sent) == chunks - 3 and len(sent) > 1
        _round_trip(c, toks, part)
        gp.close()
        c._gpu_path = None


def test_paged_sources_through_the_pool(big):
    import torch

    from kvstore_native import transfer

    ns = Namespace(model="test/wa-paged", dtype="bfloat16", num_layers=4, num_kv_heads=2, head_dim=128)
    chunks, bs, blocks = 5, 16, 120
    src = [torch.randn((2, blocks, bs, 2, 128), device="cuda").to(torch.bfloat16) for _ in range(ns.num_layers)]
    dst = [torch.zeros_like(t) for t in src]
    ids = torch.randperm(blocks)[: chunks * ns.chunk_tokens // bs].tolist()
    tok = ns.chunk_tokens
    specs = lambda layers: kgpu.Paged([transfer.paged_spec(layers, "fa_nhd", ids, tok, i * tok)  # noqa: E731
                                       for i in range(chunks)])
    tokens = list(range(tok * chunks))
    with KVStoreClient(big.addr, ns) as c:
        for round_ in range(3):    # the first from unbound reservations, the next from the pool
            toks = [t + round_ * 10**6 for t in tokens]
            assert kgpu.store_cuda(c, toks, specs(src)) == chunks
            for t in dst:
                t.zero_()
            assert kgpu.retrieve_into_cuda(c, toks, specs(dst)) == len(toks)
            n = specs(src).specs[0].chunk_bytes
            want = torch.empty(n * chunks, dtype=torch.uint8, device="cuda")
            got = torch.empty_like(want)
            for i in range(chunks):
                transfer.gather(specs(src).specs[i], int(want.data_ptr()) + i * n, device=True)
                transfer.gather(specs(dst).specs[i], int(got.data_ptr()) + i * n, device=True)
            torch.cuda.synchronize()
            assert torch.equal(got, want)
        assert c._gpu_path._write_pool.taken_slots > 0


def test_a_refused_pool_falls_back_to_keyed_reservations(tmp_path):
    """The tenant's reserved-bytes quota holds fewer chunks than one store: the pool's room
    goes back, the store lands whole through keyed windows."""
    ns = Namespace(model="test/wa-quota", dtype="bfloat16", num_layers=8, num_kv_heads=8, head_dim=128)
    size = ns.chunk_bytes()                         # 8 MiB
    d = spawn_daemon(base_dir=tmp_path, settings=["dram.capacity_bytes=1GiB", "disk.enabled=false",
                                                  'metrics.listen=""', f"quotas.max_reserved_bytes={3 * size}"])
    try:
        with KVStoreClient(d.addr, ns) as c:
            for s in range(3):
                kv = _kv(ns, 10, s)
                toks = list(range(s * 10**6, s * 10**6 + ns.chunk_tokens * 10))
                assert kgpu.store_cuda(c, toks, kv) == 10
                _round_trip(c, toks, kv)
    finally:
        d.close()


def test_no_write_ahead_keeps_keyed_stores(big):
    ns = Namespace(model="test/wa-off", **SMOL)
    with KVStoreClient(big.addr, ns) as c:
        gp = kgpu.GpuPath(c)
        gp.write_ahead_bytes = 0
        c._gpu_path = gp
        kv = _kv(ns, 4, 3)
        toks = list(range(ns.chunk_tokens * 4))
        assert kgpu.store_cuda(c, toks, kv) == 4
        assert gp._write_pool is None
        _round_trip(c, toks, kv)
        gp.close()
        c._gpu_path = None


_CHILD = r"""
import os, sys, time, torch
from kvstore_client import KVStoreClient, Namespace
from kvstore_client import gpu as kgpu
ns = Namespace(model="test/wa-killed", dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64)
c = KVStoreClient(sys.argv[1], ns)
kv = torch.randn(ns.chunk_shape(ns.chunk_tokens * 4), device="cuda").half()
assert kgpu.store_cuda(c, list(range(ns.chunk_tokens * 4)), kv) == 4
pool = c._gpu_path._write_pool
deadline = time.monotonic() + 10
while pool.ready_slots() < 4 and time.monotonic() < deadline:
    time.sleep(0.01)
assert pool.ready_slots() >= 4, pool.ready_slots()
print("READY", flush=True)
os._exit(9)
"""


def test_a_killed_client_leaks_no_pool_reservation(big):
    base = _dram_used(big.addr)
    ns = Namespace(model="test/wa-killed", **SMOL)
    proc = subprocess.run([sys.executable, "-c", _CHILD, big.addr], capture_output=True, text=True, timeout=120,
                          env={**os.environ})
    assert proc.returncode == 9 and "READY" in proc.stdout, proc.stderr[-2000:]
    stored = 4 * ns.chunk_bytes()
    assert _dram_used(big.addr) > base + stored      # the dead client's pool holds pages ...
    deadline = time.monotonic() + 15
    while _dram_used(big.addr) > base + stored and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _dram_used(big.addr) <= base + stored + ns.chunk_bytes()  # ... until the lease TTL (4 s) passes
    with KVStoreClient(big.addr, ns) as c:
        assert c.lookup(list(range(ns.chunk_tokens * 4))).matched_chunks == 4


def test_a_daemon_restart_drops_the_pool(tmp_path):
    from kvstore_testing.daemon import spawn_daemon as spawn

    ns = Namespace(model="test/wa-restart", **SMOL)
    d = spawn(base_dir=tmp_path, settings=["dram.capacity_bytes=1GiB", "disk.enabled=false", 'metrics.listen=""'])
    try:
        with KVStoreClient(d.addr, ns) as c:
            kv = _kv(ns, 4, 5)
            toks = list(range(ns.chunk_tokens * 4))
            assert c.store(toks, kv) == 4                   # routed: GPU path, pool refilled after
            pool = c._gpu_path._write_pool
            deadline = time.monotonic() + 10
            while pool.ready_slots() == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            d.restart()
            kv2 = _kv(ns, 4, 6)
            toks2 = list(range(10**6, 10**6 + ns.chunk_tokens * 4))
            assert c.store(toks2, kv2) == 4                 # the old pool's leases are not used
            assert c.lookup(toks2).matched_chunks == 4
            _round_trip(c, toks2, kv2)
            assert c._gpu_path is None or c._gpu_path._write_pool is not pool
    finally:
        d.close()
