"""Engine GPU memory -> daemon -> engine GPU memory through the same-host shared path,
against the pinned PCIe bandwidth measured in the same run.

    python bench/gpu_local_path.py [--chunks 16] [--repeats 10]

store: ``KVStoreClient.store(tokens, cuda_tensor)`` copies each chunk from the GPU straight
into its reserved extent of the daemon's arena (registered with cudaHostRegister), then
commits; retrieve: ``retrieve_into(tokens, cuda_tensor)`` leases the extents and the scatter
kernel reads them over PCIe into place. Both include the RPCs (exists, reserve, commit;
lease, release). Ceiling: cudaMemcpy between a pinned host buffer and the GPU (256 MiB).
Goal (issue 4): >= 80% of the ceiling.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from kvstore_client import KVStoreClient, Namespace
from kvstore_testing.daemon import QUIET_SETTINGS, spawn_daemon

SHAPES = {
    "SmolLM2-135M fp16": dict(dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64),
    "Llama-3-8B bf16": dict(dtype="bfloat16", num_layers=32, num_kv_heads=8, head_dim=128),
}


def ceiling() -> tuple[float, float]:
    n = 256 << 20
    host = torch.empty(n, dtype=torch.uint8).pin_memory()
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = []
    for fn in (lambda: dev.copy_(host, non_blocking=True), lambda: host.copy_(dev, non_blocking=True)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(10):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        out.append(n / statistics.median(ts) / 1e9)
    return out[0], out[1]


def run(addr: str, name: str, shape: dict, chunks: int, repeats: int) -> dict:
    ns = Namespace(model=f"bench-gpu-{name}", **shape)
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[shape["dtype"]]
    tokens = list(range(ns.chunk_tokens * chunks))
    kv = torch.randn(ns.chunk_shape(len(tokens)), device="cuda", dtype=torch.float32).to(tdt)
    nbytes = kv.numel() * kv.element_size()
    with KVStoreClient(addr, ns) as c:
        assert c.transport == "shm", "the benchmark needs the same-host path"
        keys = c.keys(tokens)
        st, rt = [], []
        out = torch.empty_like(kv)
        for r in range(repeats + 1):
            c.delete(keys)
            torch.cuda.synchronize()
            t = time.perf_counter()
            assert c.store(tokens, kv) == chunks
            st.append(time.perf_counter() - t)
            out.fill_(float("nan"))
            torch.cuda.synchronize()
            t = time.perf_counter()
            assert c.retrieve_into(tokens, out) == len(tokens)
            rt.append(time.perf_counter() - t)
            assert torch.equal(out, kv), "GPU round trip through the daemon is not bit-exact"
        c.delete(keys)
    return {"shape": name, "MB": nbytes / 1e6, "store_GBps": nbytes / statistics.median(st[1:]) / 1e9,
            "retrieve_GBps": nbytes / statistics.median(rt[1:]) / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    h2d, d2h = ceiling()
    d = spawn_daemon(settings=[*QUIET_SETTINGS, "dram.capacity_bytes=4GiB", "disk.enabled=false", "server.worker_threads=8"])
    try:
        rows = [run(d.addr, n, s, args.chunks, args.repeats) for n, s in SHAPES.items()]
    finally:
        d.close()
    print(f"device: {torch.cuda.get_device_name()}; pinned cudaMemcpy ceiling: H2D {h2d:.1f} GB/s, D2H {d2h:.1f} GB/s")
    print(f"{'shape':20} {'MB':>7} | {'store GPU->daemon':>17} {'of D2H':>7} | {'retrieve daemon->GPU':>20} {'of H2D':>7}")
    for r in rows:
        print(f"{r['shape']:20} {r['MB']:7.1f} | {r['store_GBps']:12.1f} GB/s {r['store_GBps'] / d2h:7.0%} | "
              f"{r['retrieve_GBps']:15.1f} GB/s {r['retrieve_GBps'] / h2d:7.0%}")
    print("medians over --repeats; each includes its RPCs (bit-exact round trip checked every repeat)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
