"""Same-host store/retrieve bandwidth: shared-memory path vs plain memcpy vs the gRPC path.

All three move the same KV bytes in the same run:
  * memcpy   - numpy copy of the same chunk bytes between two preallocated host buffers
               (the ceiling: what a copy into and out of the arena costs at best)
  * shm      - KVStoreClient with the same-host path: store copies each chunk straight into
               the daemon's arena extent; retrieve copies from the leased extent into place
  * grpc     - KVStoreClient(local=False): chunk bytes stream over loopback gRPC

    python bench/local_path.py [--repeats 5] [--chunks 16]

Goals (issue 4): shm >= 70% of memcpy, shm >= 5x the gRPC path. Medians of --repeats;
1 MB = 1e6 bytes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from kvstore_client import KVStoreClient, Namespace
from kvstore_testing.daemon import QUIET_SETTINGS, spawn_daemon

SHAPES = {
    "SmolLM2-135M fp16": dict(dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64),
    "Llama-3-8B bf16": dict(dtype="uint16", num_layers=32, num_kv_heads=8, head_dim=128),
}


def median_mbps(nbytes: int, fn, repeats: int, setup=None) -> float:
    rates = []
    for _ in range(repeats):
        if setup:
            setup()
        t = time.perf_counter()
        fn()
        rates.append(nbytes / (time.perf_counter() - t) / 1e6)
    return statistics.median(rates)


def run_shape(addr: str, name: str, shape: dict, chunks: int, repeats: int) -> dict:
    dtype = shape["dtype"]
    ns_fields = {**shape, "dtype": "bfloat16" if dtype == "uint16" else dtype}
    ns = Namespace(model=f"bench-local-{name}", **ns_fields)
    tokens = list(range(ns.chunk_tokens * chunks))
    rng = np.random.default_rng(0)
    kv = rng.integers(0, 2**16, size=(ns.num_layers, 2, len(tokens), ns.num_kv_heads, ns.head_dim),
                      dtype=np.uint16)
    if dtype == "float16":
        kv = kv.view(np.float16)
    nbytes = kv.nbytes
    out: dict = {"shape": name, "MB": nbytes / 1e6}

    # Ceiling: the same bytes, chunk by chunk, into a preallocated buffer and back out.
    src = np.ascontiguousarray(kv).view(np.uint8).reshape(-1)
    dst = np.empty_like(src)
    dst[:] = 1
    out["memcpy"] = median_mbps(nbytes, lambda: np.copyto(dst, src), repeats)

    for transport, local in (("shm", None), ("grpc", False)):
        with KVStoreClient(addr, ns, local=local) as c:
            assert c.transport == transport, f"wanted {transport}, client chose {c.transport}"
            keys = c.keys(tokens)
            out[f"{transport}_store"] = median_mbps(nbytes, lambda: c.store(tokens, kv), repeats,
                                                    setup=lambda: c.delete(keys))
            n, got = c.retrieve(tokens)
            assert n == len(tokens) and np.array_equal(got.view(np.uint16), kv.view(np.uint16)), "retrieve mismatch"
            out[f"{transport}_retrieve"] = median_mbps(nbytes, lambda: c.retrieve(tokens), repeats)
            into = np.empty_like(kv)
            into[...] = 0
            out[f"{transport}_into"] = median_mbps(nbytes, lambda: c.retrieve_into(tokens, into), repeats)
            assert np.array_equal(into.view(np.uint16), kv.view(np.uint16)), "retrieve_into mismatch"
            c.delete(keys)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunks", type=int, default=16)
    args = ap.parse_args(argv)
    d = spawn_daemon(settings=[*QUIET_SETTINGS, "dram.capacity_bytes=2GiB", "disk.enabled=false"])
    try:
        rows = [run_shape(d.addr, n, s, args.chunks, args.repeats) for n, s in SHAPES.items()]
    finally:
        d.close()
    print(f"\n{'shape':18} {'MB':>6} | {'memcpy':>7} | {'shm store':>9} {'shm get':>8} {'shm into':>8} | "
          f"{'grpc store':>10} {'grpc get':>8} {'grpc into':>9} | {'into/memcpy':>11} {'shm/grpc into':>13} "
          f"{'shm/grpc store':>14}")
    for r in rows:
        print(f"{r['shape']:18} {r['MB']:6.1f} | {r['memcpy']:7.0f} | {r['shm_store']:9.0f} {r['shm_retrieve']:8.0f} "
              f"{r['shm_into']:8.0f} | {r['grpc_store']:10.0f} {r['grpc_retrieve']:8.0f} {r['grpc_into']:9.0f} | "
              f"{r['shm_into'] / r['memcpy']:11.0%} {r['shm_into'] / r['grpc_into']:12.1f}x "
              f"{r['shm_store'] / r['grpc_store']:13.1f}x")
    print("MB/s, medians. memcpy: np.copyto of the same bytes between preallocated buffers (same run). "
          "get: retrieve() into a new array; into: retrieve_into() a preallocated one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
