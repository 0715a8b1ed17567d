"""GPU <-> host KV transfer: gather/scatter kernels against the pinned PCIe ceiling.

Run on a CUDA machine (after the build put libkvstore_cuda.so in native/kvstore_native/_lib):
    python bench/gpu_transfer.py [--json OUT.json]

Prints, measured in the same run:
- the ceiling: pinned host<->device cudaMemcpy bandwidth (256 MiB, median of 20);
- engine KV (per-layer DynamicCache-style tensors on the GPU) -> one contiguous chunk in
  pinned host memory, three ways: per-plane torch copies (the baseline an adapter without a
  kernel does), our gather kernel into a device staging buffer + one D2H copy, and our gather
  kernel writing straight into registered (cudaHostRegister'ed) host memory, the way the
  shared-memory arena is used;
- the reverse (chunk in pinned host -> engine KV) with the scatter kernel;
and checks every kernel result bit for bit against the CPU reference.
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
import sys

import numpy as np
import torch

from kvstore_native.transfer import PlaneSpec, gather, scatter

SHAPES = {
    # name: (layers, kv_heads, head_dim, dtype, seq)
    "SmolLM2-135M fp16": (30, 3, 64, torch.float16, 4096),
    "Llama-3-8B bf16": (32, 8, 128, torch.bfloat16, 4096),
}
CHUNK_TOKENS = 256


def timed(fn, reps=30, warmup=5) -> float:
    """Median milliseconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def pcie_ceiling() -> dict:
    n = 256 << 20
    host = torch.empty(n, dtype=torch.uint8).pin_memory()
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    h2d = timed(lambda: dev.copy_(host, non_blocking=True), reps=20)
    d2h = timed(lambda: host.copy_(dev, non_blocking=True), reps=20)
    return {"h2d_GBps": n / h2d / 1e6, "d2h_GBps": n / d2h / 1e6}


def registered_host(nbytes: int):
    """Anonymous shared mapping, page-locked with cudaHostRegister: what the client does to the arena."""
    mm = mmap.mmap(-1, nbytes, mmap.MAP_SHARED)
    arr = np.frombuffer(mm, dtype=np.uint8)
    arr[:] = 0  # fault the pages in
    rc = torch.cuda.cudart().cudaHostRegister(arr.ctypes.data, nbytes, 0)
    if int(rc if not isinstance(rc, tuple) else rc[0]) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {rc}")
    return mm, arr, torch.from_numpy(arr)


def bench_shape(name, layers, heads, dim, dtype, seq) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    planes = [torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.float32, generator=g).to(dtype)
              for _ in range(2 * layers)]
    start = 512
    spec = PlaneSpec.from_layer_tensors(planes, start, CHUNK_TOKENS)
    nbytes = spec.chunk_bytes
    out = {"shape": name, "chunk_MB": nbytes / 1e6}

    # Reference on the CPU.
    cpu_planes = [p.cpu() for p in planes]
    ref = torch.empty(nbytes, dtype=torch.uint8)
    gather(PlaneSpec.from_layer_tensors(cpu_planes, start, CHUNK_TOKENS), ref.data_ptr(), device=False)

    pinned = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    staging = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    mm, arr, reg = registered_host(nbytes)

    # Baseline: one torch copy per plane into the pinned chunk.
    views = pinned.view(dtype).view(2 * layers, CHUNK_TOKENS, heads, dim)

    def per_plane():
        for i, p in enumerate(planes):
            views[i].copy_(p[0, :, start:start + CHUNK_TOKENS].transpose(0, 1), non_blocking=True)

    out["torch_per_plane_ms"] = timed(per_plane)
    assert torch.equal(pinned, ref), "per-plane baseline wrong"

    def kernel_staged():
        gather(spec, staging.data_ptr(), device=True, stream=torch.cuda.current_stream().cuda_stream)
        pinned.copy_(staging, non_blocking=True)

    pinned.zero_()
    out["gather_staged_ms"] = timed(kernel_staged)
    assert torch.equal(pinned, ref), "gather (staged) differs from the CPU reference"

    def kernel_direct():
        gather(spec, pinned.data_ptr(), device=True, stream=torch.cuda.current_stream().cuda_stream)

    pinned.zero_()
    out["gather_direct_ms"] = timed(kernel_direct)
    torch.cuda.synchronize()
    assert torch.equal(pinned, ref), "gather (direct to registered host) differs from the CPU reference"

    # Reverse: chunk in registered host memory -> engine KV.
    back = [torch.zeros_like(p) for p in planes]
    bspec = PlaneSpec.from_layer_tensors(back, start, CHUNK_TOKENS)

    def scatter_direct():
        scatter(pinned.data_ptr(), bspec, device=True, stream=torch.cuda.current_stream().cuda_stream)

    out["scatter_direct_ms"] = timed(scatter_direct)

    def scatter_staged():
        staging.copy_(pinned, non_blocking=True)
        scatter(staging.data_ptr(), bspec, device=True, stream=torch.cuda.current_stream().cuda_stream)

    out["scatter_staged_ms"] = timed(scatter_staged)
    torch.cuda.synchronize()
    for b, p in zip(back, planes):
        assert torch.equal(b[:, :, start:start + CHUNK_TOKENS], p[:, :, start:start + CHUNK_TOKENS]), "scatter wrong"
    for k in [k for k in out if k.endswith("_ms")]:
        out[k.replace("_ms", "_GBps")] = nbytes / out[k] / 1e6
    torch.cuda.cudart().cudaHostUnregister(arr.ctypes.data)
    del reg, arr
    mm.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    ceil = pcie_ceiling()
    print(f"device: {torch.cuda.get_device_name()}  pinned PCIe ceiling: H2D {ceil['h2d_GBps']:.1f} GB/s, "
          f"D2H {ceil['d2h_GBps']:.1f} GB/s")
    rows = [bench_shape(n, *s) for n, s in SHAPES.items()]
    print(f"\n{'shape':20} {'chunk MB':>8} | {'D2H: per-plane torch':>20} {'gather+memcpy':>14} {'gather->host':>13} "
          f"{'of PCIe':>8} | {'H2D: memcpy+scatter':>20} {'scatter<-host':>14} {'of PCIe':>8}")
    for r in rows:
        best_d2h = max(r["gather_staged_GBps"], r["gather_direct_GBps"])
        best_h2d = max(r["scatter_staged_GBps"], r["scatter_direct_GBps"])
        print(f"{r['shape']:20} {r['chunk_MB']:8.2f} | {r['torch_per_plane_GBps']:15.1f} GB/s {r['gather_staged_GBps']:9.1f} GB/s "
              f"{r['gather_direct_GBps']:8.1f} GB/s {best_d2h / ceil['d2h_GBps']:8.0%} | {r['scatter_staged_GBps']:15.1f} GB/s "
              f"{r['scatter_direct_GBps']:9.1f} GB/s {best_h2d / ceil['h2d_GBps']:8.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceiling": ceil, "rows": rows, "device": torch.cuda.get_device_name()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
