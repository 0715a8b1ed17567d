"""Where one GPU store / retrieve call's time goes (issue 12), on the shipped code: RPC
latencies with the client-side checks (``client_verifies``, ``skip_verify``), the copy engine
alone over the same extents, and a cProfile of repeated calls (host-side Python time).

    python bench/gpu_profile.py [--chunks 16] [--calls 20]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _daemon import Daemon  # noqa: E402
from gpu_probe import SHAPES, TDT, copy_engine, lease_ms, med  # noqa: E402

from kvstore_client import KVStoreClient, Namespace  # noqa: E402
from kvstore_client import gpu as kgpu  # noqa: E402
from kvstore_client.gpu_session import GpuSession  # noqa: E402
from kvstore_wire._proto.kvstore.v1 import local_pb2  # noqa: E402


def profile(addr, name, shape, chunks, calls) -> list[str]:
    ns = Namespace(model=f"profile-{name}", **shape)
    tokens = list(range(ns.chunk_tokens * chunks))
    kv = torch.randn(ns.chunk_shape(len(tokens)), device="cuda").to(TDT[shape["dtype"]])
    nb = kv.numel() * kv.element_size()
    out = torch.empty_like(kv)
    lines = [f"{name}, {chunks} chunks, {nb / 1e6:.0f} MB:"]
    with KVStoreClient(addr, ns) as client:
        c = GpuSession.of(client)
        keys = c.keys(tokens)
        meta = dict(metadata=c._metadata, timeout=c.timeout_s)
        kgpu.store_cuda(client, tokens, kv)
        # One trivial call's round trip over the control socket and over gRPC (the daemon's
        # fixed cost per LocalData call).
        rel = local_pb2.ReleaseRequest(lease_ids=[1])
        ctl = client._core.control
        for how in ("control socket", "gRPC"):
            client._core.control = ctl if how == "control socket" else None
            if how == "control socket" and ctl is None:
                continue
            ts = []
            for _ in range(300):
                t = time.perf_counter()
                c._release(rel, **meta)
                ts.append(time.perf_counter() - t)
            lines.append(f"  Release (unknown lease) round trip over {how}: {statistics.median(ts) * 1e6:7.0f} us")
        client._core.control = ctl
        for k in (1, 2, chunks):
            lines.append(f"  LeaseRead(client_verifies)+Release of {k:2} chunks: "
                         f"{lease_ms(c, keys[:k], client_verifies=True):7.3f} ms")
        r = c._lease_read(local_pb2.LeaseReadRequest(namespace_id=c.namespace_id, keys=keys, client_verifies=True),
                          **meta)
        h2d, _ = copy_engine(c, r, out, ns, chunks)
        lines.append(f"  copy engine only, arena->GPU 2D: {med(h2d) * 1e3:7.3f} ms")
        c._release(local_pb2.ReleaseRequest(lease_ids=[r.lease_id]), **meta)
        rt = med(lambda: kgpu.retrieve_into_cuda(client, tokens, out), 9)
        lines.append(f"  retrieve_into_cuda: {rt * 1e3:7.3f} ms ({nb / rt / 1e9:.1f} GB/s)")
        st = []
        for _ in range(7):
            client.delete(keys)
            torch.cuda.synchronize()
            t = time.perf_counter()
            kgpu.store_cuda(client, tokens, kv)
            st.append(time.perf_counter() - t)
        lines.append(f"  store_cuda: {statistics.median(st[1:]) * 1e3:7.3f} ms ({nb / statistics.median(st[1:]) / 1e9:.1f} GB/s)")
        # The daemon's share of a store: ReserveWrite and CommitWrite of every chunk with no
        # copy in between (the extents hold zeros, so their CRC is the CRC of zeros), right
        # after the chunks were deleted (their pages may still be uncleared) and after a pause
        # that lets the daemon's background clearer finish (dram.clear_freed).
        from kvstore_wire.crc import crc32c
        from kvstore_wire.types import Encoding, KeyKind

        size = ns.chunk_bytes()
        zero_crc = crc32c(bytes(size))
        req = local_pb2.ReserveWriteRequest(namespace_id=c.namespace_id, chunks=[
            local_pb2.ChunkToWrite(key=k, key_kind=KeyKind.PREFIX, num_tokens=ns.chunk_tokens, encoding=Encoding.RAW,
                                   payload_bytes=size) for k in keys])
        for pause in (0.0, 0.3):
            rs, cs = [], []
            for _ in range(7):
                client.delete(keys)
                time.sleep(pause)
                t = time.perf_counter()
                resp = c._reserve(req, **meta)
                t1 = time.perf_counter()
                c._commit(local_pb2.CommitWriteRequest(lease_id=resp.lease_id, crc32c=[zero_crc] * len(keys),
                                                       skip_verify=True), **meta)
                rs.append(t1 - t)
                cs.append(time.perf_counter() - t1)
            lines.append(f"  ReserveWrite / CommitWrite(skip_verify) of {chunks} chunks, {pause:.1f} s after the "
                         f"delete: {statistics.median(rs[1:]) * 1e3:7.3f} / {statistics.median(cs[1:]) * 1e3:7.3f} ms")
        client.delete(keys)
        kgpu.store_cuda(client, tokens, kv)
        for what, fn in (("retrieve", lambda: kgpu.retrieve_into_cuda(client, tokens, out)),
                         ("store", lambda: (client.delete(keys), kgpu.store_cuda(client, tokens, kv)))):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
            lines.append(f"  cProfile of {calls} {what} calls (by own time):")
            lines += ["    " + x for x in buf.getvalue().splitlines() if x.strip()][3:22]
        client.delete(keys)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args(argv)
    d = Daemon("dram.capacity_bytes=8GiB", "disk.enabled=false", "server.worker_threads=8")
    try:
        for name, shape in SHAPES.items():
            print("\n".join(profile(d.addr, name, shape, args.chunks, args.calls)), flush=True)
    finally:
        d.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
