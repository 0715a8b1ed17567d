"""The floor of one unary RPC on this machine, beside the daemon's cheapest RPCs (issue 12:
why small GPU stores are bound by their two round trips).

    python bench/rpc_floor.py

Prints medians of 300 calls on loopback: a bare grpc.aio health server and a bare sync one
(baselines, each in its own process), then the daemon's health check, an empty Release and a
LeaseRead that misses. Not part of the test suite."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import statistics
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvstore_testing.daemon import spawn_daemon  # noqa: E402
from kvstore_testing.ports import free_port  # noqa: E402


def _aio(port: int) -> None:
    async def main():
        s = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), s)
        s.add_insecure_port(f"127.0.0.1:{port}")
        await s.start()
        await s.wait_for_termination()
    asyncio.run(main())


def _sync(port: int) -> None:
    s = grpc.server(futures.ThreadPoolExecutor(8))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), s)
    s.add_insecure_port(f"127.0.0.1:{port}")
    s.start()
    s.wait_for_termination()


def median_ms(fn, n: int = 300) -> float:
    for _ in range(30):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def _health(addr: str):
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(addr))
    return lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5)


def main() -> int:
    for name, target in (("bare grpc.aio health server", _aio), ("bare sync grpc health server", _sync)):
        port = free_port()
        p = mp.Process(target=target, args=(port,), daemon=True)
        p.start()
        try:
            grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=30)
            print(f"{name:40} {median_ms(_health(f'127.0.0.1:{port}')):7.3f} ms", flush=True)
        finally:
            p.terminate()
            p.join()
    from kvstore_client import KVStoreClient, Namespace
    from kvstore_client.gpu_session import GpuSession
    from kvstore_wire._proto.kvstore.v1 import local_pb2

    d = spawn_daemon(settings=["dram.capacity_bytes=256MiB", "disk.enabled=false", 'metrics.listen=""'])
    try:
        ns = Namespace(model="rpc-floor", dtype="float16", num_layers=2, num_kv_heads=1, head_dim=8, chunk_tokens=16)
        with KVStoreClient(d.addr, ns) as client:
            g = GpuSession.of(client)
            meta = dict(metadata=g._metadata, timeout=5)
            keys = client.keys(list(range(16)))
            print(f"{'daemon: health check':40} {median_ms(_health(d.addr)):7.3f} ms")
            print(f"{'daemon: Release (no leases)':40} "
                  f"{median_ms(lambda: g._release(local_pb2.ReleaseRequest(lease_ids=[]), **meta)):7.3f} ms")
            req = local_pb2.LeaseReadRequest(namespace_id=g.namespace_id, keys=keys)
            print(f"{'daemon: LeaseRead of a missing key':40} {median_ms(lambda: g._lease_read(req, **meta)):7.3f} ms")
    finally:
        d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
