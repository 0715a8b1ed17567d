"""Stores encoded on the GPU (``store_cuda(level=...)``): the bitstreams cross PCIe straight
into arena extents of their exact sizes; the bytes stored are the CPU encoder's, every reader
(GPU decode, the CPU client path) gets the CPU decoder's values, and a failed placement leaves
nothing behind."""

import numpy as np
import pytest

from kvstore_client import KVStoreClient, Namespace
from kvstore_client import gpu as kgpu
from kvstore_client.errors import InvalidArgument
from kvstore_client.gpu_session import GpuSession
from kvstore_native import transfer
from kvstore_wire._proto.kvstore.v1 import local_pb2
from kvstore_wire.types import Encoding

from .leases import count_leases

SHAPES = {"smol": dict(dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64),
          "llama": dict(dtype="bfloat16", num_layers=32, num_kv_heads=8, head_dim=128),
          "mla": dict(dtype="bfloat16", num_layers=4, num_kv_heads=1, head_dim=576, layout="MLA_LATENT")}


def _ns(name, shape):
    from kvstore_wire.types import Layout

    kw = dict(SHAPES[shape])
    if "layout" in kw:
        kw["layout"] = Layout[kw["layout"]]
    return Namespace(model=f"test/gpu-enc-{name}-{shape}", **kw)


def _kv(ns, chunks, seed=0):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    tdt = {"FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16}[ns.dtype.name]
    shape = ns.chunk_shape(ns.chunk_tokens * chunks)
    # KV-like: per-channel offsets and scales, so every codec path (constant, predicted) is hit
    base = torch.randn(shape, device="cuda", generator=g)
    scale = torch.rand(shape[-1], device="cuda", generator=g) * 4
    return (base * scale + torch.randn(shape[-1], device="cuda", generator=g)).to(tdt)


def _host_chunk(kv, ns, i):
    tok = ns.chunk_tokens
    t = kv[:, :, i * tok:(i + 1) * tok] if kv.dim() == 5 else kv[:, i * tok:(i + 1) * tok]
    return np.ascontiguousarray(t.cpu().view(__import__("torch").int16).numpy())


def _stored_blobs(c, keys):
    """The stored bytes of ``keys`` as the arena holds them (leased, then released)."""
    s = GpuSession.of(c)
    meta = dict(metadata=s._metadata, timeout=s.timeout_s)
    r = s._lease_read(local_pb2.LeaseReadRequest(namespace_id=s.namespace_id, keys=keys), **meta)
    try:
        out = []
        for e in r.extents:
            assert e.found and e.encoding == Encoding.CODEC
            out.append(bytes(s.arena.view(e.offset, e.length)))
        return out
    finally:
        s._release(local_pb2.ReleaseRequest(lease_ids=[r.lease_id]), **meta)


#: The lane count of GPU-encoded stores (GpuPath.coded_lanes' default).
STORE_LANES = 64


def _cpu_blob(codec, host16, ns, level, lanes=STORE_LANES):
    """The CPU encoder's bitstream of one chunk given as its raw 16-bit words."""
    from kvstore_native.codec.format import Layout as CLayout

    fp16 = ns.dtype.name == "FLOAT16"
    arr = host16.view(np.float16) if fp16 else host16.view(np.uint16)
    return codec.encode(arr, level, CLayout(int(ns.layout)), bf16=not fp16, lanes=lanes)


@pytest.mark.parametrize("shape", ["smol", "llama", "mla"])
@pytest.mark.parametrize("level", [1, 2, 3])
def test_gpu_encoded_store_is_the_cpu_encoders_bytes(daemon, shape, level):
    import torch

    from kvstore_native import codec

    ns = _ns(f"l{level}", shape)
    chunks = {"smol": 3, "llama": 1, "mla": 2}[shape]
    kv = _kv(ns, chunks, seed=level)
    tokens = list(range(ns.chunk_tokens * chunks))
    with KVStoreClient(daemon.addr, ns) as c:
        keys = c.keys(tokens)
        assert kgpu.store_cuda(c, tokens, kv, level=level) == chunks
        assert kgpu.store_cuda(c, tokens, kv, level=level) == 0  # stored already: nothing reserved twice
        blobs = _stored_blobs(c, keys)
        want = [_cpu_blob(codec, _host_chunk(kv, ns, i), ns, level) for i in range(chunks)]
        assert [len(b) for b in blobs] == [len(w) for w in want]
        assert blobs == want, "the GPU encoder's bitstream differs from the CPU encoder's"
        decoded = [codec.decode(w) for w in want]
        axis = 2 if kv.dim() == 5 else 1
        ref = np.concatenate([d.view(np.uint16) for d in decoded], axis=axis)
        out = torch.full_like(kv, float("nan"))
        assert kgpu.retrieve_into_cuda(c, tokens, out) == len(tokens)  # GPU decode
        assert np.array_equal(out.cpu().view(torch.int16).numpy().view(np.uint16), ref)
        n, host = c.retrieve(tokens, verify_crc=True)  # the daemon's CPU path, CRCs checked
        assert n == len(tokens) and np.array_equal(np.asarray(host).view(np.uint16), ref)
        c.delete(keys)
        if shape == "smol":   # the commit in the background: bytes in the arena when it returns
            fut = kgpu.store_cuda(c, tokens, kv, level=level, wait=False)
            assert fut.result(timeout=60) == chunks and _stored_blobs(c, keys) == want
            c.delete(keys)


@pytest.mark.parametrize("lanes", [32, 128])
def test_gpu_encoded_store_with_other_lane_counts(daemon, lanes):
    import torch

    from kvstore_client.errors import InvalidArgument
    from kvstore_native import codec

    ns = _ns(f"lanes{lanes}", "smol")
    kv = _kv(ns, 2, seed=lanes)
    tokens = list(range(ns.chunk_tokens * 2))
    with KVStoreClient(daemon.addr, ns) as c:
        for bad in (0, 48, True):
            with pytest.raises(InvalidArgument, match="lanes"):
                kgpu.store_cuda(c, tokens, kv, level=2, lanes=bad)
        assert kgpu.store_cuda(c, tokens, kv, level=2, lanes=lanes) == 2
        blobs = _stored_blobs(c, c.keys(tokens))
        assert blobs == [_cpu_blob(codec, _host_chunk(kv, ns, i), ns, 2, lanes) for i in range(2)]
        assert all(codec.info(b).lanes == lanes for b in blobs)
        out = torch.full_like(kv, float("nan"))
        assert kgpu.retrieve_into_cuda(c, tokens, out) == len(tokens)
        ref = np.concatenate([codec.decode(b).view(np.uint16) for b in blobs], axis=2 if kv.dim() == 5 else 1)
        assert np.array_equal(out.cpu().view(torch.int16).numpy().view(np.uint16), ref)
        c.delete(c.keys(tokens))


def test_gpu_encoded_store_from_paged_vllm_cache(daemon):
    import torch

    from kvstore_native import codec

    ns = Namespace(model="test/gpu-enc-paged", dtype="bfloat16", num_layers=4, num_kv_heads=2, head_dim=128)
    chunks, bs, blocks = 3, 16, 80
    layers = [torch.randn((2, blocks, bs, 2, 128), device="cuda").to(torch.bfloat16) for _ in range(ns.num_layers)]
    ids = torch.randperm(blocks)[: chunks * ns.chunk_tokens // bs].tolist()
    tok = ns.chunk_tokens
    src = kgpu.Paged([transfer.paged_spec(layers, "fa_nhd", ids, tok, i * tok) for i in range(chunks)])
    tokens = list(range(tok * chunks))
    with KVStoreClient(daemon.addr, ns) as c:
        assert kgpu.store_cuda(c, tokens, src, level=2) == chunks
        flat = torch.empty((chunks, ns.chunk_bytes()), dtype=torch.uint8, device="cuda")
        for i in range(chunks):
            transfer.gather(src.specs[i], int(flat[i].data_ptr()), device=True)
        torch.cuda.synchronize()
        shape = ns.chunk_shape()
        want = [_cpu_blob(codec, flat[i].cpu().numpy().view(np.int16).reshape(shape), ns, 2) for i in range(chunks)]
        assert _stored_blobs(c, c.keys(tokens)) == want
        c.delete(c.keys(tokens))


def test_gpu_encode_refuses_bad_levels_and_a_failed_placement_leaves_nothing(daemon, monkeypatch):
    import torch

    ns = _ns("bad", "smol")
    kv = _kv(ns, 2)
    tokens = list(range(ns.chunk_tokens * 2))
    with KVStoreClient(daemon.addr, ns) as c:
        for bad in (0, 4, -1):
            with pytest.raises(InvalidArgument):
                kgpu.store_cuda(c, tokens, kv, level=bad)
        from kvstore_native.codec import gpu as gcodec

        real = gcodec.encode_batch_placed

        def failing(chunks, level, place, **kw):
            def place_then_fail(sizes):
                place(sizes)   # extents reserved ...
                raise RuntimeError("placement failed")   # ... and the placement fails
            return real(chunks, level, place_then_fail, **kw)
        monkeypatch.setattr(gcodec, "encode_batch_placed", failing)
        with pytest.raises(RuntimeError, match="placement failed"):
            kgpu.store_cuda(c, tokens, kv, level=2)
        monkeypatch.setattr(gcodec, "encode_batch_placed", real)
        assert c.lookup(tokens).matched_tokens == 0   # nothing was published
        # the reservation was given back: the same chunks store in full afterwards
        assert kgpu.store_cuda(c, tokens, kv, level=2) == 2
        out = torch.full_like(kv, float("nan"))
        assert kgpu.retrieve_into_cuda(c, tokens, out) == len(tokens)
        assert not torch.isnan(out).any()
        c.delete(c.keys(tokens))


def test_compressed_loads_without_a_lease_never_decode_unproven_bytes(daemon):
    """Chunks this client stored compressed (or loaded compressed once) load with no LeaseRead
    while the presence index lists them in DRAM; when another client moved them, or their bytes
    in the arena changed, the GPU check refuses the guess, nothing reaches ``dst``, and the
    load goes through leases (bit-exact either way)."""
    import torch

    from kvstore_client import gpu_retrieve
    from kvstore_client.gpu_state import _path
    from kvstore_native import codec

    ns = _ns("lease-free", "smol")
    chunks = 3
    a, b = _kv(ns, chunks, seed=11), _kv(ns, chunks, seed=12)
    tok = ns.chunk_tokens
    ta, tb = list(range(tok * chunks)), list(range(10_000, 10_000 + tok * chunks))
    want = np.concatenate([codec.decode(_cpu_blob(codec, _host_chunk(a, ns, i), ns, 2)).view(np.uint16)
                           for i in range(chunks)], axis=2)

    def as_u16(t):
        return t.cpu().view(torch.int16).numpy().view(np.uint16)

    with KVStoreClient(daemon.addr, ns) as c, KVStoreClient(daemon.addr, ns) as other:
        assert kgpu.store_cuda(c, ta, a, level=2) == chunks   # c remembers where the bitstreams went
        gp = _path(c)
        spy = count_leases(gp)
        out = torch.full_like(a, float("nan"))
        assert kgpu.retrieve_into_cuda(c, ta, out) == len(ta)
        assert np.array_equal(as_u16(out), want) and spy.leases == 0

        # another client moves A: B's bitstreams take its old pages, A is stored again elsewhere
        keys = c.keys(ta)
        other.delete(keys)
        assert kgpu.store_cuda(other, tb, b, level=2) == chunks
        assert kgpu.store_cuda(other, ta, a, level=2) == chunks
        out = torch.full_like(a, 7.0)
        before = out.clone()
        contiguous = gpu_retrieve._contiguous_rows(out, ns, chunks)
        n0 = gpu_retrieve._unleased_coded(gp, keys, 0, chunks, out, contiguous, gp._arena_ptr(),
                                          torch.cuda.current_stream())
        torch.cuda.synchronize()
        # (B's bitstreams took A's old pages: the first guess fails; a chunk whose place holds
        # the very same bitstream again would be proven and placed, correctly)
        assert n0 < chunks
        assert np.array_equal(as_u16(out)[:, :, :n0 * tok], want[:, :, :n0 * tok])
        assert torch.equal(out[:, :, n0 * tok:], before[:, :, n0 * tok:])   # the failed guess never reached dst
        assert kgpu.retrieve_into_cuda(c, ta, out) == len(ta)   # through leases, remembered anew
        assert np.array_equal(as_u16(out), want) and spy.leases >= 1
        leased = spy.leases
        out = torch.full_like(a, float("nan"))
        assert kgpu.retrieve_into_cuda(c, ta, out) == len(ta)   # lease-free again
        assert np.array_equal(as_u16(out), want) and spy.leases == leased

        # the second bitstream's bytes change in the arena (a stray writer): the first chunk
        # still loads without a lease, the rest through the daemon's own check
        s = GpuSession.of(c)
        meta = dict(metadata=s._metadata, timeout=s.timeout_s)
        r = s._lease_read(local_pb2.LeaseReadRequest(namespace_id=s.namespace_id, keys=keys[1:2]), **meta)
        view = s.arena.view(r.extents[0].offset, r.extents[0].length)
        view[200] ^= 0xFF
        s._release(local_pb2.ReleaseRequest(lease_ids=[r.lease_id]), **meta)
        out = torch.full_like(a, 7.0)
        placed = kgpu.retrieve_into_cuda(c, ta, out)
        assert placed == tok   # chunk 1 fails every check: only chunk 0 is placed
        got = as_u16(out)
        assert np.array_equal(got[:, :, :tok], want[:, :, :tok])
        assert np.all(got[:, :, tok:] == np.float16(7.0).view(np.uint16))   # nothing unproven placed
        c.delete(keys + c.keys(tb))
        out = torch.full_like(a, 7.0)
        assert kgpu.retrieve_into_cuda(c, ta, out) == 0   # deleted: absent from the index
        torch.cuda.synchronize()
        assert torch.all(out == 7.0)
