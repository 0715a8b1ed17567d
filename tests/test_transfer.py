"""Paged gather/scatter: the CPU routine against numpy indexing, and the CUDA routine
against the CPU one where a GPU is present."""

import numpy as np
import pytest

from kvstore_native.transfer import PlaneSpec, TransferError, cuda_available, gather, scatter


def paged_layout(rng, layers=3, blocks=9, block_size=4, heads=2, dim=8, dtype=np.float16):
    """vLLM-style per-plane tensors [blocks, block_size, heads, dim] (K and V per layer)."""
    return [rng.standard_normal((blocks, block_size, heads, dim)).astype(dtype) for _ in range(2 * layers)]


def test_gather_matches_numpy_fancy_indexing_and_scatter_inverts_it():
    rng = np.random.default_rng(7)
    planes = paged_layout(rng)
    blocks, bs, heads, dim = planes[0].shape
    slots = [b * bs + o for b in (5, 0, 7) for o in range(bs)]  # three non-contiguous blocks
    elt = planes[0].itemsize
    spec = PlaneSpec([p.ctypes.data for p in planes], slots, heads, dim * elt, heads * dim * elt, dim * elt)
    chunk = np.full((len(planes), len(slots), heads, dim), np.nan, dtype=planes[0].dtype)
    gather(spec, chunk.ctypes.data, device=False)
    expect = np.stack([p.reshape(-1, heads, dim)[slots] for p in planes])
    assert np.array_equal(chunk, expect)

    targets = [np.zeros_like(p) for p in planes]
    tspec = PlaneSpec([t.ctypes.data for t in targets], slots, heads, dim * elt, heads * dim * elt, dim * elt)
    scatter(chunk.ctypes.data, tspec, device=False)
    for t, p in zip(targets, planes):
        flat_t, flat_p = t.reshape(-1, heads, dim), p.reshape(-1, heads, dim)
        assert np.array_equal(flat_t[slots], flat_p[slots])
        untouched = np.setdiff1d(np.arange(flat_t.shape[0]), slots)
        assert not flat_t[untouched].any()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TransferError, match="non-negative"):
        gather(PlaneSpec([0], [-1], 1, 2, 2, 2), 0, device=False)
    with pytest.raises(TransferError, match="positive"):
        gather(PlaneSpec([0], [0], 0, 2, 2, 2), 0, device=False)


@pytest.mark.gpu
def test_cuda_gather_scatter_bit_exact_with_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not cuda_available():
        pytest.skip("needs a CUDA device and libkvstore_cuda.so")
    g = torch.Generator().manual_seed(3)
    for dtype, heads, dim in [(torch.float16, 3, 64), (torch.bfloat16, 8, 128), (torch.float32, 1, 7)]:
        layers, seq = 4, 300
        cpu_planes = [torch.randn(1, heads, seq, dim, generator=g).to(dtype) for _ in range(2 * layers)]
        gpu_planes = [p.cuda() for p in cpu_planes]
        start, n = 17, 256
        ref = torch.empty(2 * layers, n, heads, dim, dtype=dtype)
        gather(PlaneSpec.from_layer_tensors(cpu_planes, start, n), ref.data_ptr(), device=False)
        out = torch.full_like(ref, float("nan")).cuda()
        gather(PlaneSpec.from_layer_tensors(gpu_planes, start, n), out.data_ptr(), device=True)
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), ref)  # random normals: no NaN, so equality is bit equality
        back = [torch.zeros_like(p) for p in gpu_planes]
        scatter(out.data_ptr(), PlaneSpec.from_layer_tensors(back, start, n), device=True)
        torch.cuda.synchronize()
        for b, p in zip(back, gpu_planes):
            assert torch.equal(b[:, :, start:start + n], p[:, :, start:start + n])
            assert not b[:, :, :start].any() and not b[:, :, start + n:].any()


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["paged", "random"])
def test_cuda_paged_and_arbitrary_slots_match_cpu(pattern):
    """Paged slots take the parameter-space fast path; arbitrary slots the device-buffer path."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not cuda_available():
        pytest.skip("needs a CUDA device and libkvstore_cuda.so")
    rng = np.random.default_rng(11)
    blocks, bs, heads, dim = 128, 16, 8, 128
    planes = [torch.randn(blocks, bs, heads, dim).half() for _ in range(6)]
    if pattern == "paged":
        slots = [int(b) * bs + o for b in rng.permutation(blocks)[:20] for o in range(bs)]
    else:
        slots = [int(s) for s in rng.choice(blocks * bs, size=300, replace=False)]
    elt = 2
    def spec(ps):
        return PlaneSpec([p.data_ptr() for p in ps], slots, heads, dim * elt, heads * dim * elt, dim * elt)
    ref = torch.empty(len(planes), len(slots), heads, dim, dtype=torch.float16)
    gather(spec(planes), ref.data_ptr(), device=False)
    gpu = [p.cuda() for p in planes]
    out = torch.empty_like(ref).cuda()
    gather(spec(gpu), out.data_ptr(), device=True)
    back = [torch.zeros_like(p) for p in gpu]
    scatter(out.data_ptr(), spec(back), device=True)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), ref)
    for b, p in zip(back, gpu):
        assert torch.equal(b.view(-1, heads, dim)[slots], p.view(-1, heads, dim)[slots])


@pytest.mark.parametrize("streaming", [False, True], ids=["cached", "streaming"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8, np.float64])
@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 37])
def test_tile_scatter_and_gather_match_numpy_for_dim_major_and_token_major_planes(dtype, tokens, streaming):
    """vLLM-CPU tiles [blocks, heads, 2N, D]: K dim-major ([D, N]), V token-major ([N, D]);
    token t goes to block ``ids[t // N]``, row ``t % N``, and nothing else is written."""
    from kvstore_native.transfer import TileSpec, gather_tiles, scatter_tiles

    rng = np.random.default_rng(tokens)
    B, H, N, D, layers = 5, 3, 32, 8, 2
    ids = [3, 0, 4, 1, 2][: -(-tokens // N)]
    caches = [np.full((B, H, 2 * N, D), 99, dtype) for _ in range(layers)]
    chunk = (rng.standard_normal((layers * 2, tokens, H, D)) * 50).astype(dtype)
    e = np.dtype(dtype).itemsize
    s0, s1 = H * 2 * N * D * e, 2 * N * D * e
    ptrs, rs, es = [], [], []
    for c in caches:
        ptrs += [c.ctypes.data, c.ctypes.data + N * D * e]
        rs += [e, D * e]
        es += [N * e, e]
    spec = TileSpec(ptrs, rs, es, [ids[t // N] * s0 for t in range(tokens)], [t % N for t in range(tokens)],
                    H, D, e, s1)
    scatter_tiles(chunk.ctypes.data, spec, streaming=streaming)
    expect = [np.full((B, H, 2 * N, D), 99, dtype) for _ in range(layers)]
    for layer in range(layers):
        for t in range(tokens):
            b, r = ids[t // N], t % N
            k_tile = expect[layer][b, :, :N].reshape(H, D, N)     # [D, N] per head
            k_tile[:, :, r] = chunk[2 * layer, t]
            expect[layer][b, :, N + r] = chunk[2 * layer + 1, t]
    for got, want in zip(caches, expect):
        assert np.array_equal(got, want)
    back = np.zeros_like(chunk)
    gather_tiles(spec, back.ctypes.data)
    assert np.array_equal(back, chunk)


def test_tile_spec_bad_arguments_raise_clear_errors():
    from kvstore_native.transfer import TileSpec, scatter_tiles

    buf = np.zeros(64, np.float32)
    good = dict(ptrs=[buf.ctypes.data], row_strides=[4], elem_strides=[4], block_offs=[0], rows=[0], heads=1,
                head_elems=4, elem_bytes=4, head_stride=16)
    for bad, msg in ((dict(elem_bytes=3), "elem_bytes"), (dict(rows=[-1]), "non-negative"),
                     (dict(elem_strides=[0]), "strides must be positive"), (dict(heads=0), "positive"),
                     (dict(row_strides=[4, 4]), "one row and element stride per plane")):
        with pytest.raises(TransferError, match=msg):
            scatter_tiles(buf.ctypes.data, TileSpec(**{**good, **bad}))
