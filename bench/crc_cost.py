"""Cost of the daemon's DRAM read verification: hardware CRC32C beside the copy it guards.

For 6 MB (SmolLM2-135M, 256 tokens) and 33 MB (Llama-3-8B geometry, 256 tokens, 16-bit) chunks:
  * crc32c      - ``kvstore_native.crc32c`` over the chunk (what ``DramTier.get`` adds)
  * copy        - ``kvstore_native.copy_into`` of the chunk (what a same-host read does)
  * stream Get  - one chunk over the stream path of a real daemon on loopback (client side)

    python bench/crc_cost.py [--repeats 20]

Reported: median milliseconds and GB/s (1 GB = 1e9 bytes), and the CRC as a fraction of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import kvstore_native as native
from kvstore_client import KVStoreClient, Namespace
from kvstore_testing.daemon import QUIET_SETTINGS, spawn_daemon
from kvstore_testing.data import kv_for

SHAPES = {
    "6 MB (SmolLM2-135M)": dict(dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64, chunk_tokens=256),
    "33 MB (Llama-3-8B)": dict(dtype="float16", num_layers=32, num_kv_heads=8, head_dim=128, chunk_tokens=256),
}


def median_s(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(f"hardware CRC32C: {native.have_hw_crc32c()}")
    d = spawn_daemon(settings=[*QUIET_SETTINGS, "dram.capacity_bytes=256MiB", "disk.enabled=false"])
    try:
        for name, shape in SHAPES.items():
            ns = Namespace(model=f"crc-cost/{name.split()[0]}", **shape)
            n = ns.chunk_bytes()
            kv = kv_for(ns, ns.chunk_tokens)
            src = kv.view(np.uint8).reshape(-1)
            dst = np.empty_like(src)
            crc = median_s(lambda: native.crc32c(src), args.repeats)
            copy = median_s(lambda: native.copy_into(memoryview(dst), memoryview(src)), args.repeats)
            toks = list(range(ns.chunk_tokens))
            with KVStoreClient(d.addr, ns, local=False) as c:
                c.store(toks, kv)
                get = median_s(lambda: c.retrieve(toks, verify_crc=False), max(3, args.repeats // 4))
            print(f"{name}: crc32c {crc * 1e3:.2f} ms ({n / crc / 1e9:.1f} GB/s), copy {copy * 1e3:.2f} ms "
                  f"({n / copy / 1e9:.1f} GB/s), stream Get {get * 1e3:.1f} ms ({n / get / 1e9:.2f} GB/s); "
                  f"CRC = {crc / copy:.0%} of the copy, {crc / get:.1%} of the stream Get")
    finally:
        d.stop()
        d.close()


if __name__ == "__main__":
    main()
