"""The vLLM connector's paged layouts on CUDA memory (FlashAttention, FlashInfer and Triton
attention; NHD, HND and per-layer views into one buffer): a chunk scattered into GPU blocks
lands where the backend's own ``[K | V]`` split reads it, bit-exact with the same scatter on
the CPU, and gathers back unchanged."""

from __future__ import annotations

import pytest
import torch

from kvstore_client.engines.vllm.layout import PagedLayout
from kvstore_wire.keys import Namespace

L, H, D, N, B = 3, 4, 64, 16, 9


def _caches(physical: str, device: str, dtype) -> dict[str, torch.Tensor]:
    names = [f"model.layers.{i}.self_attn.attn" for i in range(L)]
    if physical == "NHD":
        return {n: torch.zeros(B, N, H, 2 * D, dtype=dtype, device=device).permute(0, 2, 1, 3) for n in names}
    if physical == "HND":
        return {n: torch.zeros(B, H, N, 2 * D, dtype=dtype, device=device) for n in names}
    buf = torch.zeros(B, L, N, H, 2 * D, dtype=dtype, device=device)
    return {n: buf[:, i].permute(0, 2, 1, 3) for i, n in enumerate(names)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("physical", ["NHD", "HND", "layers-in-one-buffer"])
@pytest.mark.parametrize("backend", ["FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"])
def test_gpu_paged_layouts_match_the_cpu_scatter_and_the_backends_split(backend, physical, dtype):
    ns = Namespace(model="m@sha256:gpu", dtype="float16" if dtype == torch.float16 else "bfloat16", num_layers=L,
                   num_kv_heads=H, head_dim=D, chunk_tokens=2 * N)
    kv = torch.randn(ns.chunk_shape(3 * N + 5)).to(dtype)
    blocks = [7, 2, 5, 0]
    gpu, cpu = _caches(physical, "cuda", dtype), _caches(physical, "cpu", dtype)
    PagedLayout(gpu, {k: backend for k in gpu}, ns, N).scatter(kv.cuda(), 0, blocks)
    PagedLayout(cpu, {k: backend for k in cpu}, ns, N).scatter(kv, 0, blocks)
    torch.cuda.synchronize()
    for (name, g), c in zip(gpu.items(), cpu.values()):
        assert torch.equal(g.cpu(), c), name
        i = int(name.split(".")[2])
        k, v = g.split(D, dim=-1)          # the backends' own K/V split of the [B, H, N, 2D] view
        for tok in (0, N, 3 * N + 4):
            b, r = blocks[tok // N], tok % N
            assert torch.equal(k[b, :, r].cpu(), kv[i, 0, tok]) and torch.equal(v[b, :, r].cpu(), kv[i, 1, tok])
    out = torch.zeros(ns.chunk_shape(4 * N), dtype=dtype, device="cuda")
    PagedLayout(gpu, {k: backend for k in gpu}, ns, N).gather(blocks, out)
    assert torch.equal(out[:, :, :3 * N + 5].cpu(), kv)
