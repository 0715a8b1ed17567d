"""Lookup rate: lookups/s and p50/p99 latency with 1, 8 and 64 concurrent clients.

Each client is a grpc.aio client in its own process (so the client side does not share a
GIL with the others), looping ``Lookup`` over a 4-chunk prefix (4 keys, all hits in DRAM)
for ``--seconds``. Clients are spread over ``--procs`` processes (one asyncio task each).

    python bench/lookup_rate.py [--seconds 5] [--procs 4]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _daemon import Daemon  # noqa: E402

from kvstore_client import KVStoreClient, Namespace  # noqa: E402

NS = Namespace(model="bench/lookup", dtype="float16", num_layers=2, num_kv_heads=3, head_dim=64)
TOKENS = list(range(4 * 256))


def _worker(addr: str, tasks: int, seconds: float, start_at: float, q) -> None:
    import uvloop

    from kvstore_client import AsyncKVStoreClient

    async def main():
        c = await AsyncKVStoreClient.connect(addr, NS)
        keys = c.keys(TOKENS)
        lat: list[float] = []
        await asyncio.sleep(max(0.0, start_at - time.time()))
        end = time.perf_counter() + seconds

        async def loop():
            while time.perf_counter() < end:
                t = time.perf_counter()
                r = await c.lookup_keys(keys)
                lat.append(time.perf_counter() - t)
                assert r.matched_chunks == 4

        await asyncio.gather(*(loop() for _ in range(tasks)))
        await c.close()
        return lat

    uvloop.install()
    q.put(asyncio.run(main()))


def run(addr: str, clients: int, procs: int, seconds: float) -> tuple[float, float, float]:
    procs = min(procs, clients)
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    q = mp.Queue()
    start_at = time.time() + 1.5
    ps = [mp.Process(target=_worker, args=(addr, n, seconds, start_at, q)) for n in per]
    for p in ps:
        p.start()
    lats = np.concatenate([np.asarray(q.get()) for _ in ps])
    for p in ps:
        p.join()
    return len(lats) / seconds, float(np.percentile(lats, 50)) * 1e6, float(np.percentile(lats, 99)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=4, help="client processes (clients are spread over them)")
    args = ap.parse_args()
    d = Daemon("dram.capacity_bytes=256MiB", "disk.enabled=false")
    try:
        with KVStoreClient(d.addr, NS) as c:
            rng = np.random.default_rng(0)
            c.store(TOKENS, rng.standard_normal(NS.chunk_shape(len(TOKENS))).astype(np.float16))
        rows = [(n, *run(d.addr, n, args.procs, args.seconds)) for n in (1, 8, 64)]
    finally:
        d.close()
    print(f"\nlookup rate (4-key prefix, all DRAM hits; {os.cpu_count()} CPUs shared by daemon and clients)")
    print(f"{'clients':>7} {'lookups/s':>10} {'p50 us':>8} {'p99 us':>8}")
    for n, rate, p50, p99 in rows:
        print(f"{n:7d} {rate:10.0f} {p50:8.0f} {p99:8.0f}")


if __name__ == "__main__":
    main()
