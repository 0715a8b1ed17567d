"""Where the GPU store/retrieve time goes (issue 12): RPC latencies, copy-engine time alone,
and the end-to-end paths by group size, against a normal daemon and one that trusts the
client's GPU CRCs at commit (bench/gpu_trust_daemon.py).

    python bench/gpu_probe.py [--chunks 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import _daemon  # noqa: E402
from _daemon import Daemon  # noqa: E402

from kvstore_client import KVStoreClient, Namespace  # noqa: E402
from kvstore_client import gpu as kgpu  # noqa: E402
from kvstore_client.gpu_session import GpuSession  # noqa: E402
import kvstore_native as native  # noqa: E402
from kvstore_native import cuda_ipc  # noqa: E402
from kvstore_wire._proto.kvstore.v1 import local_pb2  # noqa: E402
from kvstore_wire.types import Encoding, KeyKind  # noqa: E402

SHAPES = {
    "SmolLM2-135M fp16": dict(dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64),
    "Llama-3-8B bf16": dict(dtype="bfloat16", num_layers=32, num_kv_heads=8, head_dim=128),
}
TDT = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class TrustDaemon(Daemon):
    """The daemon through bench/gpu_trust_daemon.py (same settings handling as Daemon)."""

    def __init__(self, *settings: str, variant: str = "trust") -> None:
        real = subprocess.Popen

        def popen(cmd, *a, **kw):
            kw["env"] = {**(kw.get("env") or os.environ), "KVSTORE_BENCH_VARIANT": variant}
            i = cmd.index("-m")
            cmd = cmd[:i] + [os.path.join(os.path.dirname(__file__), "gpu_trust_daemon.py")] + cmd[i + 2:]
            return real(cmd, *a, **kw)
        _daemon.subprocess.Popen = popen
        try:
            super().__init__(*settings)
        finally:
            _daemon.subprocess.Popen = real


def med(fn, n=7) -> float:
    fn()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def lease_ms(c: GpuSession, keys, client_verifies: bool = False) -> float:
    """Median ms of a LeaseRead of ``keys`` plus its Release (blocking stubs of session ``c``)."""
    meta = dict(metadata=c._metadata, timeout=c.timeout_s)

    def lease():
        r = c._lease_read(local_pb2.LeaseReadRequest(namespace_id=c.namespace_id, keys=keys,
                                                     client_verifies=client_verifies), **meta)
        c._release(local_pb2.ReleaseRequest(lease_ids=[r.lease_id]), **meta)
    return med(lease) * 1e3


def copy_engine(c: GpuSession, leased, out, ns, chunks):
    """``(h2d, d2h)``: the copy engine alone between the ``leased`` arena extents (a
    LeaseRead answer) and the rows of the contiguous tensor ``out``, 2D copies per chunk."""
    base = int(c.arena.view(0, 0).ctypes.data)
    rows = kgpu._contiguous_rows(out, ns, chunks)
    s = torch.cuda.current_stream().cuda_stream

    def h2d():
        for e, (b, pitch, row, planes) in zip(leased.extents, rows):
            cuda_ipc.memcpy2d(b, pitch, base + e.offset, row, row, planes, s)

    def d2h():
        for e, (b, pitch, row, planes) in zip(leased.extents, rows):
            cuda_ipc.memcpy2d(base + e.offset, row, b, pitch, row, planes, s)
    return h2d, d2h


def probe(addr, name, shape, chunks, trust) -> list[str]:
    ns = Namespace(model=f"probe-{name}", **shape)
    tokens = list(range(ns.chunk_tokens * chunks))
    kv = torch.randn(ns.chunk_shape(len(tokens)), device="cuda").to(TDT[shape["dtype"]])
    nb = kv.numel() * kv.element_size()
    out = torch.empty_like(kv)
    lines = []
    with KVStoreClient(addr, ns) as client:
        c = GpuSession.of(client)   # the blocking stubs (with .future) the GPU path uses
        keys = c.keys(tokens)
        meta = dict(metadata=c._metadata, timeout=c.timeout_s)
        kgpu.store_cuda(client, tokens, kv)
        for k in (1, 4, chunks):
            lines.append(f"  LeaseRead+Release of {k:2} chunks: {lease_ms(c, keys[:k]):7.3f} ms")
        r = c._lease_read(local_pb2.LeaseReadRequest(namespace_id=c.namespace_id, keys=keys), **meta)
        h2d, d2h = copy_engine(c, r, out, ns, chunks)
        t_h2d, t_d2h = med(h2d), med(d2h)
        lines.append(f"  copy engine only, arena<->GPU 2D: H2D {nb / t_h2d / 1e9:5.1f} GB/s, D2H {nb / t_d2h / 1e9:5.1f} GB/s")
        c._release(local_pb2.ReleaseRequest(lease_ids=[r.lease_id]), **meta)
        client.delete(keys)
        size = ns.chunk_bytes()
        zero_crc = native.crc32c(bytes(size))

        def reserve():
            return c._reserve(local_pb2.ReserveWriteRequest(namespace_id=c.namespace_id, chunks=[
                local_pb2.ChunkToWrite(key=k, key_kind=KeyKind.PREFIX, num_tokens=ns.chunk_tokens,
                                       encoding=Encoding.RAW, payload_bytes=size) for k in keys]), **meta)
        ts, tc = [], []
        for _ in range(5):
            t = time.perf_counter()
            rr = reserve()
            ts.append(time.perf_counter() - t)
            t = time.perf_counter()
            zero_crcs = [zero_crc] * sum(1 for sl in rr.slots if not sl.exists)   # reserved extents are zeroed
            c._commit(local_pb2.CommitWriteRequest(lease_id=rr.lease_id, crc32c=zero_crcs), **meta)
            tc.append(time.perf_counter() - t)
            client.delete(keys)
        lines.append(f"  ReserveWrite {chunks} chunks {statistics.median(ts) * 1e3:7.3f} ms; CommitWrite (daemon CPU CRC) "
                     f"{statistics.median(tc) * 1e3:7.3f} ms")
        for g in (1, 2, 4, chunks):
            def st():
                client.delete(keys)
                torch.cuda.synchronize()
                t = time.perf_counter()
                kgpu.store_cuda(client, tokens, kv, group_chunks=g)
                return time.perf_counter() - t
            t_st = statistics.median([st() for _ in range(5)])

            def rt():
                kgpu.retrieve_into_cuda(client, tokens, out, group_chunks=g)
            t_rt = med(rt, 5)
            assert torch.equal(out, kv)
            lines.append(f"  first request {g:2} chunks: store {nb / t_st / 1e9:5.1f} GB/s, retrieve {nb / t_rt / 1e9:5.1f} GB/s")
        client.delete(keys)
    return [f"{name} ({trust or 'stock'} daemon), {nb / 1e6:.0f} MB:"] + lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=16)
    args = ap.parse_args(argv)
    lines = []
    for variant in ("", "serial", "trust"):
        st = ("dram.capacity_bytes=8GiB", "disk.enabled=false", "server.worker_threads=8")
        d = TrustDaemon(*st, variant=variant) if variant else Daemon(*st)
        try:
            for n, s in SHAPES.items():
                lines += probe(d.addr, n, s, args.chunks, variant)
        finally:
            d.close()
    print("\n".join(lines))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_probe.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
