"""Device-gated moves (kvs_cuda_prove_prefix, kvs_cuda_copy_rows_gated, kvs_cuda_scatter_gated)
and the lease-free RAW loads built on them (``gpu_retrieve._unleased_gated``): a prefix proven
on the GPU ends at the first mismatch for good, gated kernels write exactly the proven chunks,
and a load whose arena chunk went bad places the chunks before it bit-exact and writes nothing
of it or of any chunk after it."""

import numpy as np
import pytest

from kvstore_client import KVStoreClient, Namespace
from kvstore_client import gpu as kgpu
from kvstore_native import cuda_ipc, transfer

from .leases import arena_offset


def _gate(value: int):
    import torch

    return torch.full((1,), value, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("n", [1, 5, 128, 129, 300])
def test_prove_prefix_stops_at_the_first_mismatch_across_launches(n):
    import torch

    rng = np.random.default_rng(n)
    want = rng.integers(0, 2**32, n, dtype=np.uint32)
    for bad in sorted({0, n // 2, n - 1, n}):
        got = want.copy()
        if bad < n:
            got[bad] ^= 1
        if bad + 1 < n:
            got[bad + 1:] = want[bad + 1:]   # matches after the mismatch do not extend the prefix
        dev = torch.from_numpy(got.view(np.int32)).cuda()
        gate = _gate(0)
        # In pieces of 7, as a load proves batch after batch.
        for lo in range(0, n, 7):
            hi = min(n, lo + 7)
            cuda_ipc.prove_prefix(int(dev.data_ptr()) + 4 * lo, want[lo:hi].tolist(), int(gate.data_ptr()), lo)
        torch.cuda.synchronize()
        assert int(gate.item()) == bad
        # One call for all (split into launches of 128 inside).
        gate = _gate(0)
        cuda_ipc.prove_prefix(int(dev.data_ptr()), want.tolist(), int(gate.data_ptr()), 0)
        torch.cuda.synchronize()
        assert int(gate.item()) == bad


def test_prove_prefix_leaves_a_gate_that_an_earlier_batch_ended():
    import torch

    want = [1, 2, 3]
    dev = torch.tensor(want, dtype=torch.int32, device="cuda")
    gate = _gate(2)                      # chunk 2 failed earlier: batch [3, 6) cannot extend it
    cuda_ipc.prove_prefix(int(dev.data_ptr()), want, int(gate.data_ptr()), 3)
    torch.cuda.synchronize()
    assert int(gate.item()) == 2


@pytest.mark.parametrize("gate_at", [0, 1, 3, 6, 9])
def test_gated_row_copies_write_exactly_the_proven_jobs(gate_at):
    import torch

    jobs, height, width = 6, 5, 4096
    src = torch.randint(1, 255, (jobs, height, width), dtype=torch.uint8, device="cuda")
    dst = torch.zeros((height, jobs * width), dtype=torch.uint8, device="cuda")
    dst_pitch = jobs * width
    gate = _gate(gate_at)
    first = 3
    dsts = [int(dst.data_ptr()) + j * width for j in range(jobs)]
    cuda_ipc.copy_rows_gated(dsts, [int(src[j].data_ptr()) for j in range(jobs)], dst_pitch, width, width, height,
                             int(gate.data_ptr()), first)
    torch.cuda.synchronize()
    for j in range(jobs):
        part = dst[:, j * width:(j + 1) * width]
        if first + j < gate_at:
            assert torch.equal(part, src[j])
        else:
            assert int(part.count_nonzero()) == 0
    with pytest.raises(cuda_ipc.CudaError, match="16-byte"):
        cuda_ipc.copy_rows_gated(dsts[:1], [int(src[0].data_ptr()) + 1], dst_pitch, width, width, height,
                                 int(gate.data_ptr()), first)


@pytest.mark.parametrize("layout", ["fa_nhd", "fa_hnd"])
def test_gated_scatter_writes_the_same_bytes_or_nothing(layout):
    import torch

    layers, bs, blocks, heads, dim, tok = 2, 16, 8, 2, 64, 32
    shape = (2, blocks, bs, heads, dim) if layout == "fa_nhd" else (2, blocks, heads, bs, dim)
    cache = [torch.zeros(shape, dtype=torch.float16, device="cuda") for _ in range(layers)]
    ref = [torch.zeros_like(t) for t in cache]
    ids = [5, 2, 7, 0]
    spec = transfer.paged_spec(cache, layout, ids, tok, 0)
    rspec = transfer.paged_spec(ref, layout, ids, tok, 0)
    chunk = torch.randint(-1000, 1000, (spec.chunk_bytes // 2,), dtype=torch.int16, device="cuda")
    transfer.scatter(int(chunk.data_ptr()), rspec, device=True)
    for gate_at, index, writes in ((0, 0, False), (4, 4, False), (5, 4, True)):
        for t in cache:
            t.zero_()
        gate = _gate(gate_at)   # (kept alive until the kernel ran)
        transfer.scatter(int(chunk.data_ptr()), spec, device=True, gate=(int(gate.data_ptr()), index))
        torch.cuda.synchronize()
        if writes:
            # as int16 bits: random bits read as fp16 include NaNs, which never compare equal
            assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(cache, ref))
        else:
            assert all(int(t.count_nonzero()) == 0 for t in cache)
    with pytest.raises(transfer.TransferError):
        transfer.scatter(int(chunk.data_ptr()), spec, device=False, gate=(0, 0))


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("batch_chunks", [1, 2, 8])
def test_a_gated_lease_free_load_writes_nothing_from_the_bad_chunk_on(daemon, paged, batch_chunks):
    """Chunk 2 of 5 goes bad in the arena: a lease-free load proven on the device places
    chunks 0-1 bit-exact and leaves every byte of chunks 2-4 in ``dst`` as it was, whether
    they share a batch with the bad chunk or not; the load then ends at chunk 2."""
    import torch

    from kvstore_client import gpu_retrieve
    from kvstore_client.gpu_state import _path

    ns = Namespace(model=f"test/gated-{paged}-{batch_chunks}", dtype="float16", num_layers=4, num_kv_heads=2,
                   head_dim=64)
    chunks, tok = 5, ns.chunk_tokens
    kv = torch.randn(ns.chunk_shape(tok * chunks), device="cuda").to(torch.float16)
    tokens = list(range(tok * chunks))
    with KVStoreClient(daemon.addr, ns) as c:
        gp = _path(c)
        gp.gated_loads = True
        gp.gated_batch_bytes = batch_chunks * ns.chunk_bytes()
        assert kgpu.store_cuda(c, tokens, kv) == chunks
        keys = c.keys(tokens)
        c.arena.view(arena_offset(c, keys[2]) + 100, 4)[:] ^= 0x5A            # chunk 2 goes bad in the arena
        bs = 16
        if paged:
            blocks = chunks * tok // bs
            cache = [torch.full((2, blocks, bs, 2, 64), 7.0, dtype=torch.float16, device="cuda") for _ in range(4)]
            dst = kgpu.Paged([transfer.paged_spec(cache, "fa_nhd", list(range(blocks)), tok, i * tok)
                              for i in range(chunks)])
            contiguous = None
        else:
            cache = [torch.full_like(kv, 7.0)]
            dst = cache[0]
            contiguous = gpu_retrieve._contiguous_rows(dst, ns, chunks)
        before = [t.clone() for t in cache]
        ext = gp.recall(keys, c._core.nonce, ns.chunk_bytes(), chunks)
        assert len(ext) == chunks
        placed = gpu_retrieve._unleased_gated(gp, keys, chunks, ext, dst, contiguous, ns.chunk_bytes(),
                                              gp._arena_ptr(), torch.cuda.current_stream())
        torch.cuda.synchronize()
        assert placed == 2
        if paged:
            blocks_per = tok // bs      # block b holds tokens [b*bs, (b+1)*bs)
            for t, b0 in zip(cache, before):
                assert torch.equal(t[:, 2 * blocks_per:], b0[:, 2 * blocks_per:])
            got = torch.cat([t[:, :2 * blocks_per].reshape(2, -1, 2, 64) for t in cache])
            want = torch.cat([kv[layer, :, :2 * tok] for layer in range(4)])
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        else:
            assert torch.equal(dst[:, :, 2 * tok:], before[0][:, :, 2 * tok:])
            assert torch.equal(dst[:, :, :2 * tok].view(torch.int16), kv[:, :, :2 * tok].view(torch.int16))
        c.delete(keys)
