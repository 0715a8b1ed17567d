"""Lookup rate: lookups/s and p50/p99 latency with 1, 8 and 64 concurrent clients.

Clients are asyncio tasks spread over ``--procs`` processes, looping a lookup of a 4-chunk
prefix (4 keys, all hits in DRAM) for ``--seconds``, two ways:
  * rpc      - the ``Lookup`` RPC (what a client on another host does);
  * presence - a same-host client reading the daemon's shared-memory presence index;
beside the ceiling of the RPC path measured in the same run: a bare grpc.aio unary echo
server (uvloop, no interceptor, no work) driven by the same client processes.

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
from _raw_grpc import serve_raw_grpc  # noqa: E402

from kvstore_client import KVStoreClient, Namespace  # noqa: E402
from kvstore_testing.daemon import QUIET_SETTINGS, spawn_daemon  # noqa: E402
from kvstore_testing.ports import free_port  # noqa: E402

NS = Namespace(model="bench/lookup", dtype="float16", num_layers=2, num_kv_heads=3, head_dim=64)
TOKENS = list(range(4 * 256))


def _ident(x):
    return x


def _echo_server(port: int, ready) -> None:
    import grpc

    async def echo(req, ctx):
        return req
    serve_raw_grpc(port, ready, "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo, _ident, _ident)})


def _worker(addr: str, mode: str, tasks: int, seconds: float, start_at: float, q) -> None:
    import grpc
    import uvloop

    from kvstore_client import AsyncKVStoreClient

    async def main():
        if mode == "echo":
            ch = grpc.aio.insecure_channel(addr)
            stub = ch.unary_unary("/bench.Echo/Echo", _ident, _ident)
            payload = b"k" * (4 * 32 + 40)   # about a Lookup request's size

            async def one():
                await stub(payload)
            close = ch.close
        else:
            c = await AsyncKVStoreClient.connect(addr, NS, local=(mode == "presence"))
            assert (c.presence is not None) == (mode == "presence"), f"{mode}: presence index not as expected"
            keys = c.keys(TOKENS)

            async def one():
                r = await c.lookup_keys(keys)
                assert r.matched_chunks == 4
            close = c.close
        lat: list[float] = []
        await asyncio.sleep(max(0.0, start_at - time.time()))
        end = time.perf_counter() + seconds

        async def loop():
            while time.perf_counter() < end:
                t = time.perf_counter()
                await one()
                lat.append(time.perf_counter() - t)
                if mode == "presence":
                    await asyncio.sleep(0)   # let the other tasks of this process run

        await asyncio.gather(*(loop() for _ in range(tasks)))
        await close()
        return lat

    uvloop.install()
    q.put(asyncio.run(main()))


def run(addr: str, mode: str, clients: int, procs: int, seconds: float) -> tuple[float, float, float]:
    procs = min(procs, clients)
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    q = mp.Queue()
    start_at = time.time() + 1.5
    ps = [mp.Process(target=_worker, args=(addr, mode, n, seconds, start_at, q)) for n in per]
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
    ready = mp.Event()
    port = free_port()
    echo = mp.Process(target=_echo_server, args=(port, ready), daemon=True)
    echo.start()
    ready.wait(30)
    d = spawn_daemon(settings=[*QUIET_SETTINGS, "dram.capacity_bytes=256MiB", "disk.enabled=false"])
    rows = []
    try:
        with KVStoreClient(d.addr, NS) as c:
            rng = np.random.default_rng(0)
            c.store(TOKENS, rng.standard_normal(NS.chunk_shape(len(TOKENS))).astype(np.float16))
        for mode, addr in (("echo", f"127.0.0.1:{port}"), ("rpc", d.addr), ("presence", d.addr)):
            rows += [(mode, n, *run(addr, mode, n, args.procs, args.seconds)) for n in (1, 8, 64)]
    finally:
        d.close()
        echo.kill()
    print(f"\nlookup rate (4-key prefix, all DRAM hits; {os.cpu_count()} CPUs shared by daemon and clients)")
    print(f"{'path':>30} {'clients':>7} {'lookups/s':>10} {'p50 us':>8} {'p99 us':>8}")
    names = {"echo": "ceiling: bare gRPC unary echo", "rpc": "kvstore Lookup RPC",
             "presence": "kvstore presence index (shm)"}
    for mode, n, rate, p50, p99 in rows:
        print(f"{names[mode]:>30} {n:7d} {rate:10.0f} {p50:8.1f} {p99:8.1f}")


if __name__ == "__main__":
    main()
