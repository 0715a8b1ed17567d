"""GPU CRC32C bit-exact with the CPU one; paged gather/scatter of every vLLM layout against
the CPU reference on synthetic paged caches."""

import numpy as np
import pytest

import kvstore_native as native
from kvstore_native import cuda_ipc, transfer


def test_crc_batch_is_bit_exact_with_cpu():
    import torch

    rng = np.random.default_rng()
    sizes = [0, 1, 15, 63, 64, 65, 1000, 16383, 16384, 16385, 1 << 20, (1 << 20) + 7, 5_898_240]
    bufs = [torch.from_numpy(rng.integers(0, 256, s + 1, dtype=np.uint8)).cuda() for s in sizes]
    for shift in (0, 1):  # aligned and unaligned starts
        out = torch.zeros(len(sizes), dtype=torch.int32, device="cuda")
        cuda_ipc.crc32c_batch([int(b.data_ptr()) + shift for b in bufs], sizes, int(out.data_ptr()))
        got = out.cpu().numpy().view(np.uint32)
        want = [native.crc32c(b.cpu().numpy()[shift:shift + s].tobytes()) for b, s in zip(bufs, sizes)]
        assert [int(x) for x in got] == want


def _layer(layout, blocks, bs, heads, dim, dtype, device):
    import torch

    shape = {"fa_nhd": (2, blocks, bs, heads, dim), "fa_hnd": (2, blocks, heads, bs, dim),
             "fi_nhd": (blocks, 2, bs, heads, dim), "fi_hnd": (blocks, 2, heads, bs, dim),
             "separate_nhd": (2, blocks, bs, heads, dim), "separate_hnd": (2, blocks, heads, bs, dim),
             "mla": (blocks, bs, dim)}[layout]
    return torch.randn(shape, dtype=torch.float32, device=device).to(dtype)


@pytest.mark.parametrize("layout", transfer.PAGED_LAYOUTS)
@pytest.mark.parametrize("strided", [False, True])
def test_paged_layouts_match_cpu_reference(layout, strided):
    import torch

    layers, blocks, bs, heads, dim, tokens = 3, 40, 16, 4 if layout != "mla" else 1, 64, 256
    dtype = torch.bfloat16
    if strided:  # per-layer strided views into one buffer
        one = _layer(layout, blocks, bs, heads, dim, dtype, "cuda")
        if layout.startswith(("fa_", "separate_")):  # [2, blocks, layers, ...]
            big = torch.randn((2, blocks, layers) + tuple(one.shape[2:]), device="cuda").to(dtype)
            gpu_layers = [big[:, :, i] for i in range(layers)]
        else:  # [blocks, layers, ...]
            big = torch.randn((blocks, layers) + tuple(one.shape[1:]), device="cuda").to(dtype)
            gpu_layers = [big[:, i] for i in range(layers)]
    else:
        gpu_layers = [_layer(layout, blocks, bs, heads, dim, dtype, "cuda") for _ in range(layers)]
    cpu_layers = [t.cpu() for t in gpu_layers]
    block_ids = torch.randperm(blocks)[: tokens // bs + 1].tolist()
    first = 5  # not block aligned
    gspec = transfer.paged_spec(gpu_layers, layout, block_ids, tokens, first)
    cspec = transfer.paged_spec(cpu_layers, layout, block_ids, tokens, first)
    got = torch.full((gspec.chunk_bytes,), 0xAB, dtype=torch.uint8, device="cuda")
    transfer.gather(gspec, int(got.data_ptr()), device=True)
    want = np.empty(cspec.chunk_bytes, np.uint8)
    transfer.gather(cspec, int(want.ctypes.data), device=False)
    torch.cuda.synchronize()
    assert np.array_equal(got.cpu().numpy(), want)
    # scatter: fresh chunk into the GPU cache; the CPU reference does the same on its copy
    chunk = torch.from_numpy(np.random.default_rng().integers(0, 256, cspec.chunk_bytes, dtype=np.uint8))
    dev_chunk = chunk.cuda()
    transfer.scatter(int(dev_chunk.data_ptr()), gspec, device=True)
    transfer.scatter(int(chunk.numpy().ctypes.data), cspec, device=False)
    torch.cuda.synchronize()
    for g, c in zip(gpu_layers, cpu_layers):
        assert torch.equal(g.cpu().contiguous().view(torch.int16), c.contiguous().view(torch.int16))  # bytes: random bits hold NaNs


@pytest.mark.parametrize("shift", [0, 4])  # 16-byte aligned (SM kernel) and not (copy-engine fallback)
def test_copy_rows_batch_matches_torch(shift):
    import torch

    jobs, rows, width, pitch = 5, 7, 4096 + 16, 3 * 8192
    src = torch.randint(0, 256, (jobs, rows * width + 64), dtype=torch.uint8, device="cuda")
    dst = torch.zeros(jobs * width + rows * pitch + 64, dtype=torch.uint8, device="cuda")
    base = int(dst.data_ptr()) + shift
    cuda_ipc.copy_rows([base + j * width for j in range(jobs)], [int(src[j].data_ptr()) + shift for j in range(jobs)],
                       pitch, width, width if not shift else width - 4, rows)
    torch.cuda.synchronize()
    w = width if not shift else width - 4
    for j in range(jobs):
        for r in range(rows):
            got = dst[shift + j * width + r * pitch: shift + j * width + r * pitch + w]
            assert torch.equal(got, src[j, shift + r * width: shift + r * width + w])
