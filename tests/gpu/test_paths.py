"""End-to-end GPU data path through a real daemon: pipelined store/retrieve (contiguous and
paged vLLM layouts, both chunk shapes), compressed loads decoded on the GPU, HBM tier."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from kvstore_client import KVStoreClient, Namespace
from kvstore_client import gpu as kgpu
import kvstore_native as native
from kvstore_native import transfer

from .leases import arena_offset, count_leases

SHAPES = {"smol": dict(dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64),
          "llama": dict(dtype="bfloat16", num_layers=32, num_kv_heads=8, head_dim=128)}


def _kv(ns, chunks):
    import torch

    tdt = {"FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16}[ns.dtype.name]
    return torch.randn(ns.chunk_shape(ns.chunk_tokens * chunks), device="cuda").to(tdt)


@pytest.mark.parametrize("shape", SHAPES)
def test_contiguous_round_trip_bit_exact(daemon, shape):
    import torch

    ns = Namespace(model=f"test/gpu-{shape}", **SHAPES[shape])
    chunks = 6 if shape == "smol" else 2
    kv = _kv(ns, chunks)
    tokens = list(range(ns.chunk_tokens * chunks))
    with KVStoreClient(daemon.addr, ns) as c:
        assert kgpu.store_cuda(c, tokens, kv, group_chunks=2) == chunks
        assert kgpu.store_cuda(c, tokens, kv) == 0  # already stored
        if shape == "smol":  # (two Llama chunk sets do not fit the test daemon's 96 MiB DRAM)
            c.delete(c.keys(tokens))
            fut = kgpu.store_cuda(c, tokens, kv, wait=False)  # bytes in the arena now, commit in the background
            assert fut.result(timeout=60) == chunks
        out = torch.full_like(kv, float("nan"))
        assert kgpu.retrieve_into_cuda(c, tokens, out, group_chunks=4) == len(tokens)
        assert torch.equal(out, kv)
        # the CPU path reads the same bytes (the daemon accepted the GPU checksums)
        n, host = c.retrieve(tokens, verify_crc=True)
        assert n == len(tokens) and np.array_equal(host.view(np.uint16), kv.cpu().view(torch.int16).numpy().view(np.uint16))
        c.delete(c.keys(tokens))


def _sentinel_target(ns, chunks: int, paged: bool, like):
    """A destination filled with 7.0: ``(dst, tensors behind it, gathered())``, where
    ``gathered()`` is what landed, comparable with ``_as_placed(ns, chunks, kv, paged)``.
    ``paged``: a vLLM FA-NHD cache of 16-token blocks, else a tensor like ``like``."""
    import torch

    if not paged:
        out = torch.full_like(like, 7.0)
        return out, [out], lambda: out
    blocks = chunks * ns.chunk_tokens // 16
    cache = [torch.full((2, blocks, 16, 2, 64), 7.0, dtype=torch.float16, device="cuda") for _ in range(4)]
    specs = kgpu.Paged([transfer.paged_spec(cache, "fa_nhd", list(range(blocks)), ns.chunk_tokens,
                                            i * ns.chunk_tokens) for i in range(chunks)])

    def gathered():
        flat = torch.empty(chunks * ns.chunk_bytes(), dtype=torch.uint8, device="cuda")
        for i, sp in enumerate(specs.specs):
            transfer.gather(sp, int(flat.data_ptr()) + i * ns.chunk_bytes(), device=True)
        torch.cuda.synchronize()
        return flat
    return specs, cache, gathered


def _as_placed(ns, chunks: int, kv, paged: bool):
    """``kv`` as ``_sentinel_target``'s ``gathered()`` returns it."""
    import torch

    if not paged:
        return kv
    return torch.cat([kv[:, :, i * ns.chunk_tokens:(i + 1) * ns.chunk_tokens].contiguous().view(torch.uint8).reshape(-1)
                      for i in range(chunks)])


def _two_runs(model: str, chunks: int, paged: bool):
    """A small fp16 namespace, two runs of ``chunks`` chunks (KV A at tokens ``ta``, B at
    ``tb``) and the destination helpers: ``(ns, chunks, a, b, ta, tb, target, as_bytes)``."""
    ns = Namespace(model=model, dtype="float16", num_layers=4, num_kv_heads=2, head_dim=64)
    a, b = _kv(ns, chunks), _kv(ns, chunks)
    ta = list(range(ns.chunk_tokens * chunks))
    tb = list(range(10**6, 10**6 + ns.chunk_tokens * chunks))
    return (ns, chunks, a, b, ta, tb, lambda: _sentinel_target(ns, chunks, paged, a),
            lambda kv: _as_placed(ns, chunks, kv, paged))


@pytest.mark.parametrize("paged", [False, True])
def test_speculative_loads_never_place_a_stale_guess(daemon, paged):
    """Loads copy chunks from where this client last saw them before the lease answers; when
    the chunks moved (deleted, their pages reused by others, stored again elsewhere) or are
    gone, the guess is never placed: the result is bit-exact, and a miss leaves ``dst`` alone."""
    import torch

    ns, chunks, a, b, ta, tb, target, as_bytes = _two_runs(f"test/gpu-spec-{paged}", 3, paged)

    from kvstore_client.gpu_state import _path

    with KVStoreClient(daemon.addr, ns) as c:
        _path(c).lease_free = False   # every load leases (lease-free loads: the test below)
        assert kgpu.store_cuda(c, ta, a) == chunks               # the client remembers where A went
        dst, _, got = target()
        assert kgpu.retrieve_into_cuda(c, ta, dst) == len(ta)    # speculated, confirmed
        assert torch.equal(got(), as_bytes(a))
        c.delete(c.keys(ta))
        assert kgpu.store_cuda(c, tb, b) == chunks               # B takes A's old pages
        dst, raw, got = target()
        before = [t.clone() for t in raw]
        assert kgpu.retrieve_into_cuda(c, ta, dst) == 0          # A is gone: the guesses read B's bytes
        torch.cuda.synchronize()
        assert all(torch.equal(x, y) for x, y in zip(raw, before))
        assert kgpu.store_cuda(c, ta, a) == chunks               # A again, elsewhere
        dst, _, got = target()
        assert kgpu.retrieve_into_cuda(c, ta, dst) == len(ta)
        assert torch.equal(got(), as_bytes(a))
        c.delete(c.keys(ta) + c.keys(tb))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("paged", [False, True])
def test_lease_free_loads_take_no_rpc_and_never_place_an_unproven_chunk(daemon, paged, gated):
    """A load of chunks this client saw in the arena, which the presence index lists there,
    makes no LeaseRead: bit-exact, and the reads are reported afterwards as hits. When another
    client moved the chunks (deleted, their pages reused, stored again elsewhere), the copy
    from the remembered place fails its GPU check in staging, nothing of it reaches ``dst``,
    and the load goes through leases (still bit-exact)."""
    import grpc
    import torch

    from kvstore_client import gpu_retrieve
    from kvstore_client.gpu_state import _path
    from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc

    ns, chunks, a, b, ta, tb, target, as_bytes = _two_runs(f"test/gpu-lease-free-{paged}-{gated}", 5, paged)

    with KVStoreClient(daemon.addr, ns) as c, KVStoreClient(daemon.addr, ns) as other, \
            grpc.insecure_channel(daemon.addr) as ch:
        admin = admin_pb2_grpc.AdminStub(ch)
        assert kgpu.store_cuda(c, ta, a) == chunks               # c remembers where A went
        gp = _path(c)
        gp.gated_loads = gated    # proven on the device, or on the host batch by batch
        spy = count_leases(gp)
        keys = c.keys(ta)
        hits0 = [admin.Inspect(admin_pb2.InspectRequest(namespace_id=c.namespace_id, key=k)).entry.hits for k in keys]
        dst, _, got = target()
        assert kgpu.retrieve_into_cuda(c, ta, dst) == len(ta)
        assert torch.equal(got(), as_bytes(a)) and spy.leases == 0
        gp.flush_touches()
        gp.client.drain(30)
        assert spy.touches == 1
        hits1 = [admin.Inspect(admin_pb2.InspectRequest(namespace_id=c.namespace_id, key=k)).entry.hits for k in keys]
        assert [h1 - h0 for h0, h1 in zip(hits0, hits1)] == [1] * chunks

        # Another client moves A: B takes its old pages, A is stored again elsewhere. c's memory
        # of A is stale, while the presence index still lists A.
        other.delete(keys)
        assert kgpu.store_cuda(other, tb, b) == chunks
        assert kgpu.store_cuda(other, ta, a) == chunks
        dst, raw, got = target()
        before = [t.clone() for t in raw]
        size = ns.chunk_bytes()
        contiguous = None if paged else gpu_retrieve._contiguous_rows(dst, ns, chunks)
        cur = torch.cuda.current_stream()
        assert gpu_retrieve._unleased(gp, keys, chunks, dst, contiguous, size, gp._arena_ptr(), cur) == 0
        torch.cuda.synchronize()
        assert all(torch.equal(x, y) for x, y in zip(raw, before))   # the guess never reached dst
        assert kgpu.retrieve_into_cuda(c, ta, dst) == len(ta)        # through leases
        assert torch.equal(got(), as_bytes(a)) and spy.leases >= 1
        leased = spy.leases
        dst, _, got = target()                                       # remembered anew: lease-free again
        assert kgpu.retrieve_into_cuda(c, ta, dst) == len(ta)
        assert torch.equal(got(), as_bytes(a)) and spy.leases == leased
        c.delete(keys + c.keys(tb))
        dst, raw, _ = target()
        before = [t.clone() for t in raw]
        assert kgpu.retrieve_into_cuda(c, ta, dst) == 0              # deleted: absent from the index
        torch.cuda.synchronize()
        assert all(torch.equal(x, y) for x, y in zip(raw, before))


@pytest.mark.parametrize("paged", [False, True])
def test_a_chunk_corrupted_in_the_arena_is_caught_on_the_gpu_and_dropped(daemon, paged):
    """Loads check each chunk's CRC32C on the GPU (the daemon skips its CPU check): a chunk
    whose arena bytes went bad ends the placed prefix, and the daemon drops the bad copy."""
    import torch

    from kvstore_client.gpu_session import GpuSession
    from kvstore_wire._proto.kvstore.v1 import local_pb2

    ns = Namespace(model=f"test/gpu-corrupt-{paged}", dtype="float16", num_layers=4, num_kv_heads=2, head_dim=64)
    chunks = 4
    kv = _kv(ns, chunks)
    tokens = list(range(ns.chunk_tokens * chunks))
    with KVStoreClient(daemon.addr, ns) as c:
        assert kgpu.store_cuda(c, tokens, kv) == chunks
        keys = c.keys(tokens)
        sess = GpuSession.of(c)
        c.arena.view(arena_offset(c, keys[2]) + 1000, 8)[:] = 0xEE            # chunk 2 goes bad in the arena
        out = torch.zeros_like(kv)
        if paged:
            bs = 16
            blocks = chunks * ns.chunk_tokens // bs
            cache = [torch.zeros((2, blocks, bs, 2, 64), dtype=torch.float16, device="cuda") for _ in range(4)]
            dst = kgpu.Paged([transfer.paged_spec(cache, "fa_nhd", list(range(blocks)), ns.chunk_tokens,
                                                  i * ns.chunk_tokens) for i in range(chunks)])
        else:
            dst = out
        assert kgpu.retrieve_into_cuda(c, tokens, dst) == 2 * ns.chunk_tokens
        if not paged:   # the chunks before the bad one are placed intact
            two = 2 * ns.chunk_tokens
            assert torch.equal(out[:, :, :two], kv[:, :, :two])
        # The bad copy is gone: an unchecked lease now finds a good copy (the disk tier's,
        # written behind before the damage, promoted back) or nothing.
        r = sess._lease_read(local_pb2.LeaseReadRequest(namespace_id=c.namespace_id, keys=keys[2:3],
                                                        client_verifies=True), metadata=sess._metadata)
        if r.extents[0].found:
            e = r.extents[0]
            assert native.crc32c(c.arena.view(e.offset, e.length)) == e.crc32c
        sess._release(local_pb2.ReleaseRequest(lease_ids=[r.lease_id]), metadata=sess._metadata)
        kgpu.store_cuda(c, tokens, kv)                   # stored again where missing, then whole again
        out2 = torch.zeros_like(kv)
        assert kgpu.retrieve_into_cuda(c, tokens, out2) == len(tokens) and torch.equal(out2, kv)
        c.delete(keys)


@pytest.mark.parametrize("layout", ["fa_nhd", "fi_hnd", "separate_nhd", "fa_hnd"])
def test_paged_round_trip_bit_exact(daemon, layout):
    import torch

    ns = Namespace(model=f"test/gpu-paged-{layout}", dtype="bfloat16", num_layers=4, num_kv_heads=2, head_dim=128)
    chunks, bs, blocks = 3, 16, 80
    shape = {"fa_nhd": (2, blocks, bs, 2, 128), "fa_hnd": (2, blocks, 2, bs, 128), "fi_hnd": (blocks, 2, 2, bs, 128),
             "separate_nhd": (2, blocks, bs, 2, 128)}[layout]
    src = [torch.randn(shape, device="cuda").to(torch.bfloat16) for _ in range(ns.num_layers)]
    dst = [torch.zeros_like(t) for t in src]
    ids = torch.randperm(blocks)[: chunks * ns.chunk_tokens // bs].tolist()
    tok = ns.chunk_tokens
    specs = lambda layers: kgpu.Paged([transfer.paged_spec(layers, layout, ids, tok, i * tok) for i in range(chunks)])  # noqa: E731
    tokens = list(range(tok * chunks))
    with KVStoreClient(daemon.addr, ns) as c:
        assert kgpu.store_cuda(c, tokens, specs(src), group_chunks=2) == chunks
        assert kgpu.retrieve_into_cuda(c, tokens, specs(dst)) == len(tokens)
        want = torch.empty(specs(src).specs[0].chunk_bytes * chunks, dtype=torch.uint8, device="cuda")
        got = torch.empty_like(want)
        for i in range(chunks):
            n = specs(src).specs[0].chunk_bytes
            transfer.gather(specs(src).specs[i], int(want.data_ptr()) + i * n, device=True)
            transfer.gather(specs(dst).specs[i], int(got.data_ptr()) + i * n, device=True)
        torch.cuda.synchronize()
        assert torch.equal(got, want)
        c.delete(c.keys(tokens))


@pytest.mark.parametrize("level", [1, 2, 3])
def test_compressed_load_decoded_on_gpu(daemon, level):
    import torch

    from kvstore_native import codec

    ns = Namespace(model=f"test/gpu-codec-{level}", **SHAPES["smol"])
    chunks = 4
    kv = _kv(ns, chunks)
    host = kv.cpu().numpy()
    tok = ns.chunk_tokens
    blobs = [codec.encode(np.ascontiguousarray(host[:, :, i * tok:(i + 1) * tok]), level) for i in range(chunks)]
    want = np.concatenate([codec.decode(b) for b in blobs], axis=2)
    tokens = list(range(tok * chunks))
    with KVStoreClient(daemon.addr, ns) as c:
        assert kgpu.store_encoded(c, c.keys(tokens), blobs) == chunks
        out = torch.full_like(kv, float("nan"))
        assert kgpu.retrieve_into_cuda(c, tokens, out) == len(tokens)
        assert np.array_equal(out.cpu().numpy().view(np.uint16), want.view(np.uint16))
        c.delete(c.keys(tokens))


@pytest.mark.parametrize("layout", transfer.PAGED_LAYOUTS)
def test_compressed_loads_decode_straight_into_every_paged_layout(daemon, layout):
    """Chunks stored compressed from a paged cache load into another paged cache of the same
    layout, decoded on the GPU where the engine keeps them (no staging): through leases by a
    client that never saw them, then without a lease by the one that stored them; bit-exact
    with the CPU decoder, and no block outside the chunks' is written."""
    import torch

    from kvstore_native import codec
    from kvstore_wire.types import Layout as WireLayout

    mla = layout == "mla"
    ns = Namespace(model=f"test/gpu-coded-paged-{layout}", dtype="float16", num_layers=4,
                   num_kv_heads=1 if mla else 2, head_dim=64,
                   layout=WireLayout.MLA_LATENT if mla else WireLayout.LAYER_KV_TOKEN_HEAD_DIM)
    chunks, bs, blocks, H, D = 3, 16, 60, ns.num_kv_heads, ns.head_dim
    shape = {"fa_nhd": (2, blocks, bs, H, D), "fa_hnd": (2, blocks, H, bs, D), "fi_nhd": (blocks, 2, bs, H, D),
             "fi_hnd": (blocks, 2, H, bs, D), "separate_nhd": (2, blocks, bs, H, D),
             "separate_hnd": (2, blocks, H, bs, D), "mla": (blocks, bs, D)}[layout]
    src = [torch.randn(shape, device="cuda").to(torch.float16) for _ in range(ns.num_layers)]
    tok = ns.chunk_tokens
    ids = torch.randperm(blocks)[: chunks * tok // bs].tolist()
    specs = lambda layers: kgpu.Paged([transfer.paged_spec(layers, layout, ids, tok, i * tok) for i in range(chunks)])  # noqa: E731
    n = specs(src).specs[0].chunk_bytes
    staged = torch.empty(n, dtype=torch.uint8, device="cuda")
    want = []
    for i in range(chunks):   # what the CPU codec makes of each chunk (the GPU encoder's bytes are the CPU's)
        transfer.gather(specs(src).specs[i], int(staged.data_ptr()), device=True)
        torch.cuda.synchronize()
        host = staged.cpu().numpy().view(np.float16).reshape(ns.chunk_shape())
        blob = codec.encode(np.ascontiguousarray(host), 2, codec.Layout.MLA if mla else codec.Layout.KV)
        want.append(np.ascontiguousarray(codec.decode(blob)).view(np.uint8).tobytes())

    def placed_ok(dst) -> bool:
        got = torch.empty(n, dtype=torch.uint8, device="cuda")
        for i in range(chunks):
            transfer.gather(specs(dst).specs[i], int(got.data_ptr()), device=True)
            torch.cuda.synchronize()
            if got.cpu().numpy().tobytes() != want[i]:
                return False
        free = sorted(set(range(blocks)) - set(ids))
        return all(torch.all(v[free] == 7.0) for t in dst for v in transfer.paged_views(t, layout))

    tokens = list(range(tok * chunks))
    with KVStoreClient(daemon.addr, ns) as c, KVStoreClient(daemon.addr, ns) as other:
        assert kgpu.store_cuda(c, tokens, specs(src), level=2) == chunks
        for client, leased in ((other, True), (c, False)):
            from kvstore_client.gpu_state import _path

            spy = count_leases(_path(client))
            dst = [torch.full_like(t, 7.0) for t in src]
            assert kgpu.retrieve_into_cuda(client, tokens, specs(dst)) == len(tokens)
            assert (spy.leases > 0) == leased
            assert placed_ok(dst), (layout, leased)
        c.delete(c.keys(tokens))


# ----------------------------------------------------------------------------- HBM tier
def _meta(n):
    from kvstore.types import ChunkMeta, Encoding

    return ChunkMeta(num_tokens=256, encoding=Encoding.RAW, payload_bytes=n, crc32c=0)


def _cid(i):
    return bytes([i % 256]) * 32 + i.to_bytes(32, "big")


def test_hbm_tier_contract_and_demotion():
    from kvstore.tiers.hbm import HBM_PAGE_BYTES, make_hbm_tier

    demoted = {}
    tier = make_hbm_tier(8 * HBM_PAGE_BYTES * 4, demote=lambda cid, meta, data: demoted.__setitem__(cid, bytes(data)))
    try:
        rng = np.random.default_rng()
        blobs = {_cid(i): rng.integers(0, 256, 3 * HBM_PAGE_BYTES + 5, dtype=np.uint8).tobytes() for i in range(20)}
        for cid, b in blobs.items():
            assert tier.put(cid, _meta(len(b)), b)
            assert not tier.put(cid, _meta(len(b)), b)  # immutable
        st = tier.stats()
        assert st.evictions > 0 and st.chunks + len(demoted) == len(blobs)
        for cid, b in demoted.items():
            assert blobs[cid] == b and not tier.contains(cid)  # demoted bit-exact
        for e in tier.scan():
            with tier.get(e.cid) as ref:
                assert bytes(ref.view) == blobs[e.cid]
        live = [e.cid for e in tier.scan()]
        lease = tier.lease(live[0])
        assert tier.delete(live[0]) and not tier.contains(live[0])
        lease.release()  # pages come back with the last lease
        assert tier.clear() == len(live) - 1 and tier.stats().used_bytes == 0
    finally:
        tier.close()


_CHILD = r"""
import sys, numpy as np
from kvstore_native import cuda_ipc
sys.path.insert(0, sys.argv[4])
from kvstore_client.gpu import HbmPoolMapping
import torch
m = HbmPoolMapping.open(bytes.fromhex(sys.argv[1]), int(sys.argv[2]))
n = int(sys.argv[3])
out = torch.empty(n, dtype=torch.uint8, device="cuda")
m.load(0, n, int(out.data_ptr()))
torch.cuda.synchronize()
sys.stdout.write(out.cpu().numpy().tobytes().hex())
sys.stdout.flush()
if len(sys.argv) > 5:
    import time; time.sleep(60)
m.close()
"""


def test_hbm_pool_mapped_by_second_process_and_killed_client_leaks_nothing():
    from kvstore.tiers.hbm import make_hbm_tier

    tier = make_hbm_tier(64 << 20)
    try:
        b = np.random.default_rng().integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
        cid = _cid(1)
        assert tier.put(cid, _meta(len(b)), b)
        lease = tier.lease(cid)
        off, n, release = lease.offset, lease.meta.payload_bytes, lease.release
        assert off == 0
        ex = tier.export()
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        args = [sys.executable, "-c", _CHILD, ex.ipc_handle.hex(), str(ex.pool_bytes), str(n), os.path.join(here, "client")]
        got = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert got.returncode == 0, got.stderr
        assert bytes.fromhex(got.stdout) == b
        # a client killed while it holds the mapping: the pool stays intact and reusable
        p = subprocess.Popen(args + ["hold"], stdout=subprocess.PIPE, text=True)
        assert bytes.fromhex(p.stdout.read(2 * n)) == b
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        release()
        with tier.get(cid) as ref:
            assert bytes(ref.view) == b
        assert tier.delete(cid) and tier.stats().used_bytes == 0
        assert tier.put(_cid(2), _meta(len(b)), b)
    finally:
        tier.close()


@pytest.mark.parametrize("routed", [False, True])
def test_store_larger_than_the_reservation_quota(tmp_path, routed):
    """A GPU store bigger than the tenant's open-reservation quota lands whole: the client
    reserves a window at a time after the daemon refuses the pipelined reservations. With a
    quota smaller than one chunk the direct call says RESOURCE_EXHAUSTED and the routed client
    streams the chunks instead."""
    import torch

    from kvstore_client.errors import ResourceExhausted
    from kvstore_testing.daemon import spawn_daemon

    ns = Namespace(model="test/gpu-quota", dtype="bfloat16", num_layers=8, num_kv_heads=8, head_dim=128)
    size = ns.chunk_bytes()                        # 8 MiB
    chunks = 10
    kv = _kv(ns, chunks)
    tokens = list(range(ns.chunk_tokens * chunks))
    for quota, whole in ((3 * size, True), (size // 2, False)):
        d = spawn_daemon(base_dir=tmp_path / f"q{quota}", settings=[
            "dram.capacity_bytes=256MiB", "disk.enabled=false", f"quotas.max_reserved_bytes={quota}"])
        try:
            with KVStoreClient(d.addr, ns) as c:
                if routed:
                    assert c.store(tokens, kv) == chunks
                elif whole:
                    assert kgpu.store_cuda(c, tokens, kv) == chunks
                else:
                    with pytest.raises(ResourceExhausted, match="max_reserved_bytes"):
                        kgpu.store_cuda(c, tokens, kv)
                    continue
                out = torch.full_like(kv, float("nan"))
                assert kgpu.retrieve_into_cuda(c, tokens, out) == len(tokens)
                assert torch.equal(out, kv)
        finally:
            d.close()
