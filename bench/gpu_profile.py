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

try:   # absent in checkouts before keys hashed as read (bench/compare_checkouts.sh runs old ones)
    from kvstore_wire.keys import PrefixKeys  # noqa: E402
except ImportError:
    PrefixKeys = None


def timed_stores(client, keys, store, runs: int, then=None) -> float:
    """Median seconds of ``store()`` right after ``keys`` were deleted (the first run not
    counted); ``then(result)`` runs after each timing (e.g. waits for a ``wait=False`` commit)."""
    ts = []
    for _ in range(runs):
        client.delete(keys)
        torch.cuda.synchronize()
        t = time.perf_counter()
        got = store()
        ts.append(time.perf_counter() - t)
        if then is not None:
            then(got)
    return statistics.median(ts[1:])


def cprofiled(fn, calls: int, what: str, top: int = 14) -> list[str]:
    """A cProfile of ``calls`` calls of ``fn`` (host time, by own time), as indented lines."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return [f"  cProfile of {calls} {what} (by own time):"] + \
        ["    " + x for x in buf.getvalue().splitlines() if x.strip()][3:22]


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
        st = timed_stores(client, keys, lambda: kgpu.store_cuda(client, tokens, kv), 7)
        lines.append(f"  store_cuda: {st * 1e3:7.3f} ms ({nb / st / 1e9:.1f} GB/s)")
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
            lines += cprofiled(fn, calls, f"{what} calls", 14)
        client.delete(keys)
    return lines


def kv_like(ns, chunks, seed=1):
    """KV-like data on the GPU (kvstore_testing.codec_data.synthetic_kv; real SmolLM2 KV from
    ``KVSTORE_BENCH_KV_NPY`` when set: fp16/fp32 ``[30, 2, T, 3, 64]``, windows repeated)."""
    import numpy as np

    from kvstore_testing.codec_data import synthetic_kv

    tokens = ns.chunk_tokens * chunks
    path = os.environ.get("KVSTORE_BENCH_KV_NPY")
    if path and ns.num_layers == 30 and ns.num_kv_heads == 3:
        kv = np.load(path).astype(np.float16)
        reps = -(-tokens // kv.shape[2])
        forms = [kv, -kv, kv[:, :, ::-1], -kv[:, :, ::-1]]
        kv = np.concatenate([forms[i % 4] * np.float16(0.5 ** (i // 4)) for i in range(reps)], axis=2)[:, :, :tokens]
    else:
        kv = synthetic_kv(ns.num_layers, tokens, ns.num_kv_heads, ns.head_dim, seed=seed, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(kv)).to(TDT[str(ns.dtype.name).lower()]).cuda()


def compressed(addr, name, shape, chunks, calls, level=2, lanes=64) -> list[str]:
    """Where a compressed load's and a GPU-encoded store's time goes: each stage alone beside
    the whole call."""
    import numpy as np

    from kvstore_native import cuda_ipc
    from kvstore_native.codec import gpu as gcodec

    ns = Namespace(model=f"profile-codec-{name}", **shape)
    tokens = list(range(ns.chunk_tokens * chunks))
    kv = kv_like(ns, chunks)
    nb = kv.numel() * kv.element_size()
    out = torch.empty_like(kv)
    lines = [f"{name}, {chunks} chunks, {nb / 1e6:.0f} MB, level {level}, {lanes} lanes (KV-like data):"]
    with KVStoreClient(addr, ns) as client:
        c = GpuSession.of(client)
        keys = c.keys(tokens)
        meta = dict(metadata=c._metadata, timeout=c.timeout_s)
        def stored_all(got) -> None:
            assert got == chunks

        s_med = timed_stores(client, keys, lambda: kgpu.store_cuda(client, tokens, kv, level=level, lanes=lanes), 5,
                             stored_all)
        sa_med = timed_stores(client, keys, lambda: kgpu.store_cuda(client, tokens, kv, level=level, wait=False,
                                                                   lanes=lanes), 5,
                              lambda fut: stored_all(fut.result()))
        srcs = [kv[:, :, i * ns.chunk_tokens:(i + 1) * ns.chunk_tokens].contiguous() for i in range(chunks)]
        host = torch.empty(gcodec.encode_bound_batch(srcs[0], chunks, level), dtype=torch.uint8).pin_memory()
        enc = med(lambda: gcodec.encode_batch_into(srcs, level, host, lanes=lanes), 5)
        r = c._lease_read(local_pb2.LeaseReadRequest(namespace_id=c.namespace_id, keys=keys, client_verifies=True),
                          **meta)
        base = int(c.arena.view(0, 0).ctypes.data)
        exts = list(r.extents)
        lens = [int(e.length) for e in exts]
        coded = sum(lens)
        lines.append(f"  stored {coded / 1e6:.1f} MB of bitstreams (ratio {nb / coded:.2f}x)")
        lines.append(f"  store_cuda(level={level}): {s_med * 1e3:7.3f} ms ({nb / s_med / 1e9:.1f} GB/s of KV), "
                     f"wait=False {sa_med * 1e3:7.3f} ms ({nb / sa_med / 1e9:.1f} GB/s); "
                     f"encode_batch_into a pinned buffer alone: {enc * 1e3:7.3f} ms ({nb / enc / 1e9:.1f} GB/s)")
        dev = torch.empty(coded, dtype=torch.uint8, device="cuda")
        offs = np.cumsum([0] + lens[:-1]).tolist()
        s = torch.cuda.current_stream().cuda_stream
        h2d = med(lambda: cuda_ipc.memcpy_batch([int(dev.data_ptr()) + o for o in offs],
                                                [base + e.offset for e in exts], lens, s))
        crc_out = torch.empty(chunks, dtype=torch.int32, device="cuda")
        crc1 = med(lambda: [cuda_ipc.crc32c_batch([int(dev.data_ptr()) + o], [ln], int(crc_out.data_ptr()), s)
                            for o, ln in zip(offs, lens)])
        crcb = med(lambda: cuda_ipc.crc32c_batch([int(dev.data_ptr()) + o for o in offs], lens,
                                                 int(crc_out.data_ptr()), s))
        outs = torch.empty((chunks, ns.chunk_bytes()), dtype=torch.uint8, device="cuda")
        dec = med(lambda: gcodec.decode_batch_ptrs([base + e.offset for e in exts], [int(dev.data_ptr()) + o for o in offs],
                                                   lens, [int(outs[j].data_ptr()) for j in range(chunks)],
                                                   ns.chunk_bytes(), s))
        rows = kgpu._contiguous_rows(out, ns, chunks)
        mv = med(lambda: [cuda_ipc.memcpy2d(b, pitch, int(outs[j].data_ptr()), row, row, planes, s)
                          for j, (b, pitch, row, planes) in enumerate(rows)])
        # The mapped load alone (what retrieve_into_cuda now calls): copies, GPU CRCs and the
        # decode straight into the tensor in one native call, by the number of groups.
        from kvstore_client.gpu_layout import decode_map
        from kvstore_native.codec.format import DType, Layout

        dmap = decode_map(out, rows, ns, list(range(chunks)))
        shp, dt = (ns.num_layers, ns.chunk_tokens, ns.num_kv_heads, ns.head_dim), DType(int(ns.dtype))
        want = [int(e.crc32c) for e in exts]
        mapped = {g: med(lambda g=g: gcodec.load_mapped([base + e.offset for e in exts], lens, dt, Layout.KV, shp, dmap,
                                                        s, want_crcs=want, groups=g)) for g in (1, 2, 4, 0)}
        c._release(local_pb2.ReleaseRequest(lease_ids=[r.lease_id]), **meta)
        lease = lease_ms(c, keys, client_verifies=True)
        from kvstore_client.gpu_state import _path

        gp = _path(client)
        gp.lease_free = False
        rl = med(lambda: kgpu.retrieve_into_cuda(client, tokens, out), 9)
        gp.lease_free = True
        rt = med(lambda: kgpu.retrieve_into_cuda(client, tokens, out), 9)
        lines.append(f"  retrieve_into_cuda (compressed): leased {rl * 1e3:7.3f} ms ({nb / rl / 1e9:.1f} GB/s of KV); "
                     f"lease-free {rt * 1e3:7.3f} ms ({nb / rt / 1e9:.1f} GB/s of KV)")
        lines.append(f"    LeaseRead+Release {lease:7.3f} ms | bitstreams H2D {h2d * 1e3:7.3f} ms | GPU CRC per chunk "
                     f"{crc1 * 1e3:7.3f} / batched {crcb * 1e3:7.3f} ms | decode_batch_ptrs {dec * 1e3:7.3f} ms | "
                     f"move into the tensor {mv * 1e3:7.3f} ms | sum {lease + (h2d + crcb + dec + mv) * 1e3:7.3f} ms")
        lines.append("    load_mapped alone (H2D + GPU CRC + decode into the tensor), by groups: " + " | ".join(
            f"{'default' if g == 0 else g}: {t * 1e3:6.3f} ms ({nb / t / 1e9:.0f} GB/s)" for g, t in mapped.items()))
        lines += cprofiled(lambda: kgpu.retrieve_into_cuda(client, tokens, out), calls, "compressed retrieve calls", 10)
        client.delete(keys)
    return lines


def hbm(name, shape, chunks, calls) -> list[str]:
    """Where a load from the daemon's HBM tier goes (lease-free, the pool's generations):
    the routed call, the GPU path's call, its lease-free step alone, the pool copy alone."""
    from kvstore_client import gpu_retrieve
    from kvstore_client.gpu_state import _path
    from kvstore_native import cuda_ipc

    d = Daemon("dram.capacity_bytes=8GiB", "disk.enabled=false", "server.worker_threads=8",
               "hbm.capacity_bytes=8GiB", 'chain.tiers=["hbm","dram"]')
    lines = []
    try:
        ns = Namespace(model=f"profile-hbm-{name}", **shape)
        tokens = list(range(ns.chunk_tokens * chunks))
        kv = torch.randn(ns.chunk_shape(len(tokens)), device="cuda").to(TDT[shape["dtype"]])
        nb = kv.numel() * kv.element_size()
        out = torch.empty_like(kv)
        with KVStoreClient(d.addr, ns) as client:
            client.store(tokens, kv)
            for _ in range(2):
                client.retrieve_into(tokens, out)
            gp = _path(client)
            pool = gp.pool()
            keys = client.keys(tokens)
            rows = kgpu._contiguous_rows(out, ns, chunks)
            ext = gp.recall_pool(keys, chunks)
            cur = torch.cuda.current_stream()
            routed = med(lambda: client.retrieve_into(tokens, out), 15)
            direct = med(lambda: kgpu.retrieve_into_cuda(client, tokens, out), 15)
            step = med(lambda: gpu_retrieve._unleased_hbm(gp, keys, chunks, out, rows, pool, cur), 15)
            s_ = cur.cuda_stream
            _, pitch, row, planes = rows[0]
            copy = med(lambda: cuda_ipc.copy_rows([r[0] for r in rows], [pool.base + e[0] for e in ext], pitch, row,
                                                  row, planes, s_), 15)
            keyt = med(lambda: client.keys(tokens), 15)
            lazy = None
            if PrefixKeys is not None:   # the step hashing its keys as it reads them (overlapped with copies)
                lazy = med(lambda: gpu_retrieve._unleased_hbm(gp, PrefixKeys(client.namespace_id, tokens,
                                                                             ns.chunk_tokens),
                                                              chunks, out, rows, pool, cur), 15)
            twin = torch.empty_like(kv)   # the ceiling: one D2D copy of the same bytes, same timer
            d2d = nb / med(lambda: twin.copy_(kv), 15) / 1e9
            del twin
            lines.append(f"HBM tier, {name}, {chunks} chunks, {nb / 1e6:.0f} MB ({len(ext)} remembered): routed "
                         f"retrieve_into {routed * 1e3:.3f} ms ({nb / routed / 1e9:.0f} GB/s, "
                         f"{nb / routed / 1e9 / d2d:.0%} of D2D) | retrieve_into_cuda {direct * 1e3:.3f} ms "
                         f"({nb / direct / 1e9 / d2d:.0%}) | _unleased_hbm {step * 1e3:.3f} ms"
                         + (f", hashing its keys {lazy * 1e3:.3f} ms" if lazy is not None else "")
                         + f" | copy_rows alone {copy * 1e3:.3f} ms ({nb / copy / 1e9:.0f} GB/s) | keys() "
                         f"{keyt * 1e3:.3f} ms | D2D copy of the same bytes {d2d:.0f} GB/s")
            for what, fn in (("routed", lambda: client.retrieve_into(tokens, out)),
                             ("direct", lambda: kgpu.retrieve_into_cuda(client, tokens, out))):
                lines += cprofiled(fn, calls, f"{what} HBM loads", 16)
            client.delete(keys)
    finally:
        d.close()
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--hbm-only", action="store_true")
    ap.add_argument("--codec-only", action="store_true", help="only the compressed loads and GPU-encoded stores")
    ap.add_argument("--decoder", default=None, help="GPU decoder of the compressed loads (kvstore_native.codec.gpu"
                    ".DECODERS; default: the library's)")
    ap.add_argument("--encoder", default=None, help="statistics pass of the GPU encoder of the compressed stores "
                    "(kvstore_native.codec.gpu.ENCODERS; default: the library's)")
    ap.add_argument("--lanes", type=int, default=64, help="rANS lanes of the GPU-encoded stores (32, 64, 128; "
                    "default: the client's, 64)")
    args = ap.parse_args(argv)
    from kvstore_native.codec import gpu as gcodec_

    if args.decoder:
        gcodec_.set_decoder(args.decoder, 4)
    if args.encoder:
        gcodec_.set_encoder(args.encoder)
    if args.hbm_only:
        for name, shape in SHAPES.items():
            print("\n".join(hbm(name, shape, args.chunks, args.calls)), flush=True)
        return 0
    d = Daemon("dram.capacity_bytes=8GiB", "disk.enabled=false", "server.worker_threads=8")
    try:
        for name, shape in SHAPES.items():
            print("\n".join(compressed(d.addr, name, shape, args.chunks if "Smol" in name else 4, args.calls,
                                        lanes=args.lanes)),
                  flush=True)
        for name, shape in SHAPES.items() if not args.codec_only else ():
            print("\n".join(profile(d.addr, name, shape, args.chunks, args.calls)), flush=True)
    finally:
        d.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
