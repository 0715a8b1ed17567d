"""Loads from the daemon's HBM pool without a lease: the pool's generation counters (a shared
file, incremented for every page run the daemon allocates before it writes it) prove that the
bytes a client copied device-to-device were not reused under the copy."""

import os
import stat

import numpy as np
import pytest

from kvstore_client import KVStoreClient, Namespace

from .leases import count_leases

HBM = ["hbm.capacity_bytes=64MiB", 'chain.tiers=["hbm","dram"]', "disk.enabled=false"]


def _cid(i):
    return bytes([i % 256]) * 32 + i.to_bytes(32, "big")


def _meta(n):
    from kvstore.types import ChunkMeta, Encoding

    return ChunkMeta(num_tokens=256, encoding=Encoding.RAW, payload_bytes=n, crc32c=0)


def test_generations_are_bumped_before_a_page_run_is_written_and_the_file_goes_with_the_pool():
    from kvstore.tiers.hbm import GEN_BLOCK_BYTES, make_hbm_tier

    tier = make_hbm_tier(8 * GEN_BLOCK_BYTES)
    ex = tier.export()
    try:
        assert ex.generations_path and ex.generation_block_bytes == GEN_BLOCK_BYTES
        st = os.stat(ex.generations_path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 8 * 8
        gens = np.fromfile(ex.generations_path, dtype=np.uint64)
        assert not gens.any()
        b = bytes(3 * GEN_BLOCK_BYTES // 2)   # 1.5 blocks: blocks 0 and 1
        assert tier.put(_cid(1), _meta(len(b)), b)
        gens = np.fromfile(ex.generations_path, dtype=np.uint64)
        assert gens.tolist()[:3] == [1, 1, 0]
        assert tier.delete(_cid(1))   # freeing writes nothing: no bump
        assert np.fromfile(ex.generations_path, dtype=np.uint64).tolist()[:3] == [1, 1, 0]
        assert tier.put(_cid(2), _meta(len(b)), b)   # the freed pages reused: bumped again
        assert np.fromfile(ex.generations_path, dtype=np.uint64).tolist()[:3] == [2, 2, 0]
        assert tier.touch(_cid(2)) and not tier.touch(_cid(1))
    finally:
        tier.close()
    assert not os.path.exists(ex.generations_path)


@pytest.mark.parametrize("paged", [False, True])
def test_hbm_loads_without_a_lease_are_proven_by_the_generations(daemon_factory, paged):
    import torch

    from kvstore_client import gpu as kgpu
    from kvstore_client import gpu_retrieve
    from kvstore_client.gpu_state import _path
    from kvstore_native import transfer

    d = daemon_factory(settings=tuple(HBM))
    ns = Namespace(model=f"test/hbm-lease-free-{paged}", dtype="float16", num_layers=4, num_kv_heads=2, head_dim=64)
    chunks, tok = 4, ns.chunk_tokens
    a = torch.randn(ns.chunk_shape(tok * chunks), device="cuda").to(torch.float16)
    b = torch.randn_like(a)
    ta, tb = list(range(tok * chunks)), list(range(50_000, 50_000 + tok * chunks))

    def target():
        if not paged:
            out = torch.full_like(a, 7.0)
            return out, lambda: out
        blocks = chunks * tok // 16
        cache = [torch.full((2, blocks, 16, 2, 64), 7.0, dtype=torch.float16, device="cuda") for _ in range(4)]
        specs = kgpu.Paged([transfer.paged_spec(cache, "fa_nhd", list(range(blocks)), tok, i * tok)
                            for i in range(chunks)])

        def got():
            flat = torch.empty((chunks, ns.chunk_bytes()), dtype=torch.uint8, device="cuda")
            for i, sp in enumerate(specs.specs):
                transfer.gather(sp, int(flat[i].data_ptr()), device=True)
            torch.cuda.synchronize()
            return flat
        return specs, got

    def as_placed(kv):
        if not paged:
            return kv
        flat = torch.empty((chunks, ns.chunk_bytes()), dtype=torch.uint8, device="cuda")
        for i in range(chunks):
            flat[i].copy_(kv[:, :, i * tok:(i + 1) * tok].contiguous().view(torch.uint8).flatten())
        return flat

    with KVStoreClient(d.addr, ns) as c, KVStoreClient(d.addr, ns) as other:
        assert c._core.hbm is not None and c._core.hbm.generations_path
        assert kgpu.store_cuda(c, ta, a) == chunks
        gp = _path(c)
        for _ in range(2):   # promotes A into the pool, then loads it from there through a lease
            dst, got = target()
            assert kgpu.retrieve_into_cuda(c, ta, dst) == len(ta) and torch.equal(got(), as_placed(a))
        assert {t.name for t in c.exists(c.keys(ta))} == {"HBM"}
        spy = count_leases(gp)
        dst, got = target()
        assert kgpu.retrieve_into_cuda(c, ta, dst) == len(ta)   # no LeaseRead at all
        assert torch.equal(got(), as_placed(a)) and spy.leases == 0

        # Another client moves A: B takes its pages in the pool, A is promoted again elsewhere.
        keys = c.keys(ta)
        other.delete(keys)
        assert kgpu.store_cuda(other, tb, b) == chunks
        out_b = torch.empty_like(b)
        assert kgpu.retrieve_into_cuda(other, tb, out_b) == len(tb) and torch.equal(out_b, b)   # B into the pool
        assert kgpu.store_cuda(other, ta, a) == chunks
        assert kgpu.retrieve_into_cuda(other, ta, torch.empty_like(a)) == len(ta)   # A into the pool anew
        dst, got = target()
        contiguous = None if paged else gpu_retrieve._contiguous_rows(dst, ns, chunks)
        assert gpu_retrieve._unleased_hbm(gp, keys, chunks, dst, contiguous, gp.pool(), torch.cuda.current_stream()) == 0
        assert kgpu.retrieve_into_cuda(c, ta, dst) == len(ta)   # through leases, bit-exact
        assert torch.equal(got(), as_placed(a)) and spy.leases >= 1
        leased = spy.leases
        dst, got = target()
        assert kgpu.retrieve_into_cuda(c, ta, dst) == len(ta)   # remembered anew: lease-free again
        assert torch.equal(got(), as_placed(a)) and spy.leases == leased
        c.delete(keys + c.keys(tb))
        dst, got = target()
        assert kgpu.retrieve_into_cuda(c, ta, dst) == 0   # deleted: absent from the index


def test_grouped_lease_free_hbm_loads_copy_nothing_past_the_first_unproven_chunk(daemon_factory):
    """The lease-free HBM step copies in growing groups while it hashes and checks the next:
    a chunk that fails its check in a later group ends the run there (nothing from it on is
    copied, the groups before it are), the call then leases the rest, bit-exact; a bad token id
    in a later chunk of a lazily hashed call is an error, with the engine's stream still ordered
    after the copies already launched."""
    import torch

    from kvstore_client import gpu as kgpu
    from kvstore_client import gpu_retrieve
    from kvstore_client.gpu_state import _path
    from kvstore_wire.keys import PrefixKeys

    d = daemon_factory(settings=tuple(HBM))
    ns = Namespace(model="test/hbm-lease-free-groups", dtype="float16", num_layers=4, num_kv_heads=2, head_dim=64)
    chunks, tok = 12, ns.chunk_tokens
    assert gpu_retrieve.HBM_FIRST_GROUP == 2   # groups [0, 2), [2, 6), [6, 12)
    a = torch.randn(ns.chunk_shape(tok * chunks), device="cuda").to(torch.float16)
    ta = list(range(7, 7 + tok * chunks))
    with KVStoreClient(d.addr, ns) as c:
        assert kgpu.store_cuda(c, ta, a) == chunks
        for _ in range(2):   # into the pool, then remembered from a leased pool read
            assert kgpu.retrieve_into_cuda(c, ta, torch.empty_like(a)) == len(ta)
        gp = _path(c)
        keys = c.keys(ta)
        assert len(gp.recall_pool(keys, chunks)) == chunks
        spy = count_leases(gp)
        out = torch.full_like(a, 7.0)
        assert kgpu.retrieve_into_cuda(c, ta, out) == len(ta) and torch.equal(out, a) and spy.leases == 0

        gp.forget(keys[8])   # unproven: the third group stops at it
        out = torch.full_like(a, 7.0)
        cur = torch.cuda.current_stream()
        rows = gpu_retrieve._contiguous_rows(out, ns, chunks)
        assert gpu_retrieve._unleased_hbm(gp, PrefixKeys(c.namespace_id, ta, tok), chunks, out, rows, gp.pool(),
                                          cur) == 8
        torch.cuda.synchronize()
        assert torch.equal(out[:, :, :8 * tok], a[:, :, :8 * tok])
        assert bool((out[:, :, 8 * tok:] == 7.0).all())   # nothing copied for chunk 8 on
        assert kgpu.retrieve_into_cuda(c, ta, out) == len(ta) and torch.equal(out, a) and spy.leases >= 1

        bad = list(ta)
        bad[9 * tok + 3] = -1   # chunk 9: hashed only after the first groups copied
        out = torch.full_like(a, 7.0)
        with pytest.raises(ValueError, match="token ids must"):
            c.retrieve_into(bad, out)
        torch.cuda.synchronize()
        assert torch.equal(out[:, :, :6 * tok], a[:, :, :6 * tok])   # what was launched landed whole
