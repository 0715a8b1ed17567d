"""Every GPU benchmark of issue 12 in one call, beside the ceilings measured in the same run.

    python bench/gpu_all.py [--chunks 16] [--repeats 8] [--out DIR]

Ceilings: pinned cudaMemcpy H2D / D2H (256 MiB) and a device-to-device copy (1 GiB, bytes
read + written counted once as the copy's size). Paths (both chunk shapes, 256-token chunks,
end to end through a real daemon, RPCs included, bit-exact check each repeat):
  new store/retrieve, contiguous engine tensor (copy engine 2D, GPU CRC, pipelined RPCs);
  new store/retrieve, vLLM FlashAttention paged blocks (kernel into device staging + copy engine);
  old KVStoreClient.store / retrieve_into (one chunk at a time, CPU CRC at commit).
SM time: gather/scatter kernel durations (events) of the direct-over-PCIe kernel vs the
D2D staging kernel, per chunk. Compressed load: effective KV bytes/s by level (bitstreams H2D,
batched GPU decode). GPU encode speed. HBM tier: pool -> engine D2D load vs the D2D ceiling.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _daemon import Daemon  # noqa: E402

from kvstore_client import KVStoreClient, Namespace  # noqa: E402
from kvstore_client import gpu as kgpu  # noqa: E402
from kvstore_native import cuda_ipc, transfer  # noqa: E402
import kvstore_wire.keys as wkeys  # noqa: E402

SHAPES = {
    "SmolLM2-135M fp16": dict(dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64),
    "Llama-3-8B bf16": dict(dtype="bfloat16", num_layers=32, num_kv_heads=8, head_dim=128),
}
TDT = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def med_time(fn, repeats=10, warm=2) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def ceilings() -> dict:
    n = 256 << 20
    host = torch.empty(n, dtype=torch.uint8).pin_memory()
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return {"h2d": n / med_time(lambda: dev.copy_(host, non_blocking=True)) / 1e9,
            "d2h": n / med_time(lambda: host.copy_(dev, non_blocking=True)) / 1e9,
            "d2d": a.numel() / med_time(lambda: b.copy_(a)) / 1e9}


def kernel_ms(fn, repeats=20) -> float:
    """Median device time of fn's launches on the current stream (events)."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def crc_bench() -> dict:
    import kvstore_native as native

    n = 64 << 20
    buf = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    out = torch.empty(16, dtype=torch.int32, device="cuda")
    ptrs = [int(buf.data_ptr()) + i * (n // 16) for i in range(16)]
    ms = kernel_ms(lambda: cuda_ipc.crc32c_batch(ptrs, [n // 16] * 16, int(out.data_ptr())))
    got = [int(x) for x in out.cpu().numpy().view(np.uint32)]
    h = buf.cpu().numpy()
    want = [native.crc32c(h[i * (n // 16):(i + 1) * (n // 16)].tobytes()) for i in range(16)]
    assert got == want, "GPU CRC32C differs from kvs_crc32c"
    return {"crc_GBps": n / ms / 1e6}


def paged_cache(ns, chunks, bs=16):
    """A vLLM FlashAttention NHD cache per layer with the sequence's blocks shuffled."""
    tdt = TDT[ns.dtype.name.lower()]
    blocks = chunks * ns.chunk_tokens // bs + 8
    layers = [torch.randn((2, blocks, bs, ns.num_kv_heads, ns.head_dim), device="cuda").to(tdt)
              for _ in range(ns.num_layers)]
    ids = torch.randperm(blocks)[: chunks * ns.chunk_tokens // bs].tolist()
    return layers, ids


def paged_specs(layers, ids, ns, chunks):
    tok = ns.chunk_tokens
    return kgpu.Paged([transfer.paged_spec(layers, "fa_nhd", ids, tok, i * tok) for i in range(chunks)])


def e2e(addr, name, shape, chunks, repeats, variants=("ce", "paged", "old"), daemon_checks=False,
        growth=None, speculate=True, lease_free=True, batch_mib=0, prefill_bytes=0, write_ahead=True,
        streamed_calls=8, commit_tail=None, refill_late=False, gated=False, gated_mib=0) -> dict:
    """``daemon_checks``: the client asks for the daemon's CPU passes (verify at commit and
    before each read lease) instead of its GPU checks, as before they existed. ``growth``:
    the request groups' growth factor (1: the first group, then the rest in one).
    ``prefill_bytes``: first store that many bytes of other chunks (another namespace), so
    the arena is full and every store evicts, as in a fleet's steady state. ``write_ahead``
    False: stores reserve keyed extents per call (``GpuPath.write_ahead_bytes = 0``), as
    before write-ahead reservations; a number: the write-ahead pool's bytes. ``commit_tail``:
    ``GpuPath.commit_tail_bytes`` (0: one CommitWrite per write-ahead lease, as before).
    ``refill_late``: the write-ahead pool refilled once a store's commits are answered, not as
    it starts. ``gated``: lease-free loads proven on the device (``GpuPath.gated_loads``), not
    on the host batch by batch; ``gated_mib``: their batches' MiB."""
    from kvstore_client.gpu_state import _path

    ns = Namespace(model=f"bench-gpu-{name}", **shape)
    tdt = TDT[shape["dtype"]]
    tokens = list(range(ns.chunk_tokens * chunks))
    kv = torch.randn(ns.chunk_shape(len(tokens)), device="cuda").to(tdt)
    nbytes = kv.numel() * kv.element_size()
    row = {"shape": name, "MB": nbytes / 1e6}
    if prefill_bytes:
        with KVStoreClient(addr, Namespace(model=f"bench-gpu-fill-{name}", **shape)) as f:
            for j in range(-(-prefill_bytes // nbytes)):
                kgpu.store_cuda(f, [t + (j + 1) * 10**7 for t in tokens], kv)
    with KVStoreClient(addr, ns) as c:
        gp = _path(c)
        if daemon_checks:
            gp.client_verifies = gp.skip_commit_verify = False
        if growth is not None:
            gp.group_growth = gp.store_group_growth = growth
        gp.speculate = speculate
        gp.lease_free = lease_free
        if commit_tail is not None:
            gp.commit_tail_bytes = commit_tail
        gp.refill_after_commits = refill_late
        gp.gated_loads = gated
        if gated_mib:
            gp.gated_batch_bytes = gated_mib << 20
        if write_ahead is not True:
            gp.write_ahead_bytes = int(write_ahead)   # False: 0, no pool; else the pool's bytes
        if batch_mib:
            gp.unleased_batch_bytes = batch_mib << 20
            gp.staging_bytes = max(gp.staging_bytes, 2 * gp.unleased_batch_bytes)
        keys = c.keys(tokens)
        out = torch.empty_like(kv)

        def cycle(store, retrieve, check, tag):
            st, rt = [], []
            for r in range(repeats + 1):
                c.delete(keys)
                torch.cuda.synchronize()
                t = time.perf_counter()
                assert store() == chunks
                torch.cuda.synchronize()
                st.append(time.perf_counter() - t)
                t = time.perf_counter()
                assert retrieve() == len(tokens)
                torch.cuda.synchronize()
                rt.append(time.perf_counter() - t)
                assert check(), f"{tag}: round trip not bit-exact"
            row[f"{tag}_store"] = nbytes / statistics.median(st[1:]) / 1e9
            row[f"{tag}_retrieve"] = nbytes / statistics.median(rt[1:]) / 1e9

        def fresh():
            out.fill_(float("nan"))
            return True

        cycle(lambda: kgpu.store_cuda(c, tokens, kv),
              lambda: fresh() and kgpu.retrieve_into_cuda(c, tokens, out), lambda: torch.equal(out, kv), "ce")
        # Stores that return once the bytes are in the arena (wait=False): `streamed_calls`
        # calls back to back, as an engine saves layer after layer or request after request,
        # each call's CommitWrite overlapping the next call's copies; all commits awaited
        # inside the timing (the sustained store bandwidth).
        sets = [list(range(10_000_000 * (k + 1), 10_000_000 * (k + 1) + len(tokens))) for k in range(streamed_calls)]
        ts = []
        for r in range(max(2, repeats // 2) + 1):
            for t4 in sets:
                c.delete(c.keys(t4))
            torch.cuda.synchronize()
            t = time.perf_counter()
            futs = [kgpu.store_cuda(c, t4, kv, wait=False) for t4 in sets]
            assert sum(f.result() for f in futs) == len(sets) * chunks
            ts.append(time.perf_counter() - t)
        for t4 in sets:
            c.delete(c.keys(t4))
        row["ce_store_streamed"] = len(sets) * nbytes / statistics.median(ts[1:]) / 1e9
        row["streamed_calls"] = len(sets)
        pool = gp._write_pool
        row["pool"] = None if pool is None else dict(target_chunks=pool.target_chunks, taken=pool.taken_slots,
                                                      refills=pool.refills, refused=pool.refused)
        if variants == ("ce",):
            c.delete(keys)
            return row
        layers, ids = paged_cache(ns, chunks)
        dlayers = [torch.empty_like(t) for t in layers]
        src, ids_spec = paged_specs(layers, ids, ns, chunks), paged_specs(dlayers, ids, ns, chunks)

        def paged_equal():
            ok = True
            for sp, dp in zip(src.specs, ids_spec.specs):
                a = torch.empty(sp.chunk_bytes, dtype=torch.uint8, device="cuda")
                b = torch.empty_like(a)
                transfer.gather(sp, int(a.data_ptr()), device=True)
                transfer.gather(dp, int(b.data_ptr()), device=True)
                ok = ok and torch.equal(a, b)
            return ok

        cycle(lambda: kgpu.store_cuda(c, tokens, src), lambda: kgpu.retrieve_into_cuda(c, tokens, ids_spec),
              paged_equal, "paged")
        cycle(lambda: c.store(tokens, kv), lambda: fresh() and c.retrieve_into(tokens, out),
              lambda: torch.equal(out, kv), "old")   # KVStoreClient.store / retrieve_into: routed to the GPU path
        c.delete(keys)
        # SM time per chunk: the kernel straight over PCIe vs the D2D staging kernel
        spec = src.specs[0]
        host = torch.empty(spec.chunk_bytes, dtype=torch.uint8).pin_memory()
        dev = torch.empty(spec.chunk_bytes, dtype=torch.uint8, device="cuda")
        s = torch.cuda.current_stream().cuda_stream
        row["sm_gather_pcie_ms"] = kernel_ms(lambda: transfer.gather(spec, int(host.data_ptr()), device=True, stream=s))
        row["sm_scatter_pcie_ms"] = kernel_ms(lambda: transfer.scatter(int(host.data_ptr()), spec, device=True, stream=s))
        row["sm_gather_d2d_ms"] = kernel_ms(lambda: transfer.gather(spec, int(dev.data_ptr()), device=True, stream=s))
        row["sm_scatter_d2d_ms"] = kernel_ms(lambda: transfer.scatter(int(dev.data_ptr()), spec, device=True, stream=s))
        row["ce_chunk_d2h_ms"] = kernel_ms(lambda: cuda_ipc.memcpy_batch([int(host.data_ptr())], [int(dev.data_ptr())],
                                                                          [spec.chunk_bytes], s))
        row["chunk_MB"] = spec.chunk_bytes / 1e6
    return row


def codec_bench(addr, chunks, repeats) -> list[dict]:
    from kvstore_native import codec
    from kvstore_native.codec import gpu as gcodec

    ns = Namespace(model="bench-gpu-codec", **SHAPES["SmolLM2-135M fp16"])
    tok = ns.chunk_tokens
    tokens = list(range(tok * chunks))
    from gpu_profile import kv_like, timed_stores

    kv = kv_like(ns, chunks)   # KV-like data (random normals compress like no real KV does)
    host = kv.cpu().numpy()
    nbytes = kv.numel() * 2
    rows = []
    with KVStoreClient(addr, ns) as c:
        keys = c.keys(tokens)
        out = torch.empty_like(kv)
        for level in (1, 2, 3):
            blobs = [codec.encode(np.ascontiguousarray(host[:, :, i * tok:(i + 1) * tok]), level,
                                  threads=8) for i in range(chunks)]
            want = torch.from_numpy(np.concatenate([codec.decode(b) for b in blobs], axis=2)).cuda()
            c.delete(keys)
            assert kgpu.store_encoded(c, keys, blobs) == chunks
            ts = []
            for r in range(repeats + 1):
                out.fill_(float("nan"))
                torch.cuda.synchronize()
                t = time.perf_counter()
                assert kgpu.retrieve_into_cuda(c, tokens, out) == len(tokens)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
                assert torch.equal(out, want), "GPU decode differs from the CPU decode"
            devb = [torch.frombuffer(bytearray(b), dtype=torch.uint8).cuda() for b in blobs]
            hostb = [np.frombuffer(b, dtype=np.uint8) for b in blobs]
            outs = torch.empty((chunks, ns.chunk_bytes()), dtype=torch.uint8, device="cuda")
            dec_ms = kernel_ms(lambda: gcodec.decode_batch_ptrs(
                [int(h.ctypes.data) for h in hostb], [int(d.data_ptr()) for d in devb], [len(b) for b in blobs],
                [int(outs[j].data_ptr()) for j in range(chunks)], ns.chunk_bytes(), torch.cuda.current_stream().cuda_stream),
                repeats=10)
            srcs = [kv[:, :, i * tok:(i + 1) * tok].contiguous() for i in range(chunks)]
            pinned = torch.empty(gcodec.encode_bound_batch(srcs[0], chunks, level), dtype=torch.uint8).pin_memory()
            enc_s = med_time(lambda: (gcodec.encode_batch_into(srcs, level, pinned), torch.cuda.synchronize()),
                             repeats=5, warm=1)
            # The whole store from GPU memory: batched GPU encode, bitstreams D2H straight into
            # the arena extents reserved for their sizes, CommitWrite.
            def stored_all(got) -> None:
                assert got == chunks

            st = timed_stores(c, keys, lambda: kgpu.store_cuda(c, tokens, kv, level=level), 4, stored_all)
            out.fill_(float("nan"))
            assert kgpu.retrieve_into_cuda(c, tokens, out) == len(tokens)
            assert torch.equal(out, want), "a GPU-encoded store does not decode to the CPU codec's values"
            ratio = nbytes / sum(len(b) for b in blobs)
            rows.append({"level": level, "ratio": ratio, "load_GBps": nbytes / statistics.median(ts[1:]) / 1e9,
                         "decode_kernel_GBps": nbytes / dec_ms / 1e6,
                         "encode_GBps": nbytes / enc_s / 1e9,
                         "store_encoded_GBps": nbytes / st / 1e9})
        c.delete(keys)
    return rows


def hbm_e2e(chunks, repeats) -> list[dict]:
    """Through a daemon whose chain is ["hbm", "dram"]: KVStoreClient.store (routed to the GPU
    path), one retrieve_into that promotes the chunks into HBM, then timed retrieve_into calls
    served from the pool device-to-device (LeaseRead with device_pool, one copy_rows launch)."""
    d = Daemon("dram.capacity_bytes=8GiB", "disk.enabled=false", "server.worker_threads=8",
               "hbm.capacity_bytes=8GiB", 'chain.tiers=["hbm","dram"]')
    rows = []
    try:
        for name, shape in SHAPES.items():
            ns = Namespace(model=f"bench-hbm-{name}", **shape)
            tokens = list(range(ns.chunk_tokens * chunks))
            kv = torch.randn(ns.chunk_shape(len(tokens)), device="cuda").to(TDT[shape["dtype"]])
            nbytes = kv.numel() * kv.element_size()
            with KVStoreClient(d.addr, ns) as c:
                assert c._core.hbm is not None, "the daemon exported no HBM pool"
                assert c.store(tokens, kv) == chunks
                out = torch.empty_like(kv)
                t = time.perf_counter()
                assert c.retrieve_into(tokens, out) == len(tokens)
                torch.cuda.synchronize()
                first = time.perf_counter() - t
                assert torch.equal(out, kv)
                tiers = {t.name for t in c.exists(c.keys(tokens))}
                from kvstore_client.gpu_state import _path

                def loads() -> float:
                    """Median seconds of a bit-exact retrieve_into from the pool."""
                    ts = []
                    for r in range(repeats + 1):
                        out.fill_(float("nan"))
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        assert c.retrieve_into(tokens, out) == len(tokens)
                        torch.cuda.synchronize()
                        ts.append(time.perf_counter() - t)
                        assert torch.equal(out, kv), "HBM load not bit-exact"
                    return statistics.median(ts[1:])

                gp = _path(c)
                lease_free = loads()
                # the same loads with hashlib's prefix-key chain
                native_chain, wkeys._native_chain = wkeys._native_chain, None
                try:
                    py_keys = loads()
                finally:
                    wkeys._native_chain = native_chain
                gp.lease_free = False   # the same loads, each through a LeaseRead (device_pool)
                leased = loads()
                gp.lease_free = True
                rows.append({"shape": name, "MB": nbytes / 1e6, "tiers": sorted(tiers),
                             "first_GBps": nbytes / first / 1e9, "hbm_GBps": nbytes / lease_free / 1e9,
                             "native_keys": native_chain is not None, "hbm_pykeys_GBps": nbytes / py_keys / 1e9,
                             "hbm_leased_GBps": nbytes / leased / 1e9})
                c.delete(c.keys(tokens))
    finally:
        d.close()
    return rows


def hbm_bench(chunks) -> dict:
    from kvstore.tiers.hbm import make_hbm_tier
    from kvstore.types import ChunkMeta, Encoding

    ns = Namespace(model="bench-gpu-hbm", **SHAPES["Llama-3-8B bf16"])
    size = ns.chunk_bytes()
    tier = make_hbm_tier(size * chunks + (1 << 20))
    try:
        src = torch.randint(0, 256, (chunks, size), dtype=torch.uint8, device="cuda")
        for i in range(chunks):
            assert tier.put_device(bytes([i]) * 64, ChunkMeta(256, Encoding.RAW, size, 0), int(src[i].data_ptr()))
        ex = tier.export()
        m = kgpu.HbmPoolMapping(tier.base, ex.pool_bytes)  # same process: the pool's own pointer
        leases = [tier.lease(bytes([i]) * 64) for i in range(chunks)]
        kv = torch.empty(ns.chunk_shape(ns.chunk_tokens * chunks), device="cuda", dtype=torch.bfloat16)
        s = torch.cuda.current_stream().cuda_stream

        def load_ce():
            for i, d in enumerate(leases):
                m.load(d.offset, size, kv, ns, chunk=i, stream=s)
        ms_ce = kernel_ms(load_ce, repeats=10)
        ms = kernel_ms(lambda: m.load_many([(d.offset, size) for d in leases], kv, ns, stream=s), repeats=10)
        ok = all(torch.equal(kv[:, :, i * 256:(i + 1) * 256].contiguous().view(torch.uint8).flatten(), src[i])
                 for i in range(chunks))
        for d in leases:
            d.release()
        return {"hbm_load_GBps": size * chunks / ms / 1e6, "hbm_load_ce_GBps": size * chunks / ms_ce / 1e6,
                "bit_exact": ok}
    finally:
        tier.close()


def host_passes(total=512 << 20, threads=16) -> dict:
    """The daemon's CPU passes over a same-host extent, at its thread count, in 4 MiB pieces:
    a plain memset (how extents were cleared before), non-temporal ``kvs_zero`` (now), and the
    parallel CRC32C of a commit or read check. GB/s, median of 5."""
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    import kvstore_native as native
    from kvstore.store.crc_parallel import PieceCrc

    buf = np.ones(total, np.uint8)
    piece = 4 << 20
    views = [memoryview(buf)[i:i + piece] for i in range(0, total, piece)]
    out = {}
    with ThreadPoolExecutor(threads) as pool:
        def run(fn):
            ts = []
            for _ in range(6):
                t = time.perf_counter()
                list(pool.map(fn, views))
                ts.append(time.perf_counter() - t)
            return total / statistics.median(ts[1:]) / 1e9
        out["memset_GBps"] = run(lambda v: ctypes.memset(np.frombuffer(v, np.uint8).ctypes.data, 0, v.nbytes))
        out["nt_zero_GBps"] = run(native.zero)
        pc = PieceCrc(piece)
        ts = []
        for _ in range(6):
            t = time.perf_counter()
            pc.crc_many([memoryview(buf)], pool)
            ts.append(time.perf_counter() - t)
        out["crc_GBps"] = total / statistics.median(ts[1:]) / 1e9
    out["threads"] = threads
    return out


def _guard(errors: list, what: str, fn, default):
    """Runs one section; a failure is recorded (and printed) instead of losing the others."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the output, the run goes on
        import traceback

        traceback.print_exc()
        errors.append(f"{what}: {type(e).__name__}: {e}")
        return default


def _wanted(shape: str) -> bool:
    """Whether ``shape`` is among ``GPU_ALL_SHAPES`` (comma-separated name prefixes; all if unset)."""
    want = [w for w in os.environ.get("GPU_ALL_SHAPES", "").split(",") if w]
    return not want or any(shape.startswith(w) for w in want)


def _pct(x, ceil):
    return f"{x:10.1f} {x / ceil:7.0%}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    ap.add_argument("--skip-codec", action="store_true")
    ap.add_argument("--skip-hbm", action="store_true", help="leave out the HBM tier rows")
    ap.add_argument("--quick", action="store_true",
                    help="contiguous copy-engine rows only (no paged / routed rows, no x4 run) and, with "
                         "GPU_ALL_SHAPES (comma-separated prefixes, e.g. SmolLM2), only those shapes")
    args = ap.parse_args(argv)
    errors: list[str] = []
    ceil = ceilings()
    crc = _guard(errors, "gpu crc", crc_bench, {"crc_GBps": float("nan")})
    from gpu_probe import TrustDaemon

    settings = ("dram.capacity_bytes=8GiB", "disk.enabled=false", "server.worker_threads=8")
    runs: dict[str, list] = {}
    times: collections.Counter = collections.Counter()
    big, crow = None, []
    passes = _guard(errors, "host passes", lambda: host_passes(threads=min(16, os.cpu_count() or 1)), None)
    # stock: this code (GPU CRC checks, commits taken unread, stale pages cleared by streaming
    # stores); checks: the same daemon, the client asking for the daemon's CPU checks instead;
    # memset: stock with extents cleared by plain memset, as before (bench/gpu_trust_daemon.py);
    # two-groups: stock with each call's requests in two groups (the first, then the rest);
    # leased: stock with every load asking LeaseRead first (speculative copies meanwhile), as
    # before lease-free loads; no-spec: leased with copies waiting for the LeaseRead answer;
    # batchN: stock with lease-free loads checked in batches of N MiB (default 32; staging
    # grown to two batches); noclear: stock with the daemon's background clearing of freed
    # pages off (each ReserveWrite zeroes what it takes, as before); full: stock with the
    # arena filled with other chunks first (every store evicts); full-target: full with
    # dram.free_target_bytes=1GiB (the clearer evicts ahead and clears the room); full-noclear;
    # keyed: stock with stores reserving keyed extents per call (no write-ahead pool), as
    # before; full-target-keyed; poolN: stock with a write-ahead pool of N MiB (default 256);
    # grpc, full-target-grpc: with the daemon's control socket off (server.local_control=false:
    # every LocalData call over gRPC, as before); tailN: stock with write-ahead stores committed
    # in shrinking groups down to N MiB; gated, gatedN: stock with lease-free loads proven on
    # the device (in batches of N MiB); new: commits in groups down to 16 MiB, the pool refilled
    # after the commits and loads proven on the device (the opt-in settings to measure).
    extra = {"noclear": ("dram.clear_freed=false",), "full-noclear": ("dram.clear_freed=false",),
             "full-target": ("dram.free_target_bytes=1GiB",), "full-target-keyed": ("dram.free_target_bytes=1GiB",),
             "grpc": ("server.local_control=false",),
             "full-target-grpc": ("dram.free_target_bytes=1GiB", "server.local_control=false")}
    for variant in os.environ.get("GPU_ALL_VARIANTS", "stock,checks,two-groups").split(","):
        times[variant] += 1   # a variant named again keeps its rows apart: stock, ..., stock#2
        label = variant if times[variant] == 1 else f"{variant}#{times[variant]}"
        vs = (*settings, *extra.get(variant, ()))
        d = TrustDaemon(*vs, variant=variant) if variant == "memset" else Daemon(*vs)
        try:
            variants = ("ce", "paged", "old") if variant == "stock" and not args.quick else ("ce",)
            runs[label] = [_guard(errors, f"e2e {variant} {n}", lambda n=n, sh=sh: e2e(
                d.addr, n, sh, args.chunks, args.repeats, variants, daemon_checks=variant == "checks",
                growth=1 if variant == "two-groups" else None, speculate=variant != "no-spec",
                lease_free=variant not in ("leased", "no-spec"),
                batch_mib=int(variant[5:]) if variant.startswith("batch") else 0,
                prefill_bytes=(8 << 30) if variant.startswith("full") else 0,
                write_ahead=(int(variant[4:]) << 20 if variant.startswith("pool") else "keyed" not in variant),
                commit_tail=(int(variant[4:]) << 20 if variant.startswith("tail") else 16 << 20 if variant == "new"
                             else None),
                refill_late=variant == "new", gated=variant == "new" or variant.startswith("gated"),
                gated_mib=int(variant[5:]) if variant.startswith("gated") and variant[5:] else 0),
                None)
                             for n, sh in SHAPES.items() if _wanted(n)]
            # Each variant's rows as they come (a run cut short by its time limit keeps them).
            print(f"[{label}] " + json.dumps(runs[label], default=str), flush=True)
            if variant == "stock" and not args.quick:
                smol = SHAPES["SmolLM2-135M fp16"]
                big = _guard(errors, "e2e x4", lambda: e2e(d.addr, "SmolLM2-135M fp16", smol, 4 * args.chunks,
                                                           args.repeats, ("ce",)), None)
                if not args.skip_codec:
                    crow = _guard(errors, "codec", lambda: codec_bench(d.addr, args.chunks, args.repeats), [])
        finally:
            d.close()
    hbm_rows = [] if args.skip_hbm else _guard(errors, "hbm e2e", lambda: hbm_e2e(args.chunks, args.repeats), [])
    hbm = None if args.skip_hbm else _guard(errors, "hbm pool load", lambda: hbm_bench(8), None)
    h2d, d2h, d2d = ceil["h2d"], ceil["d2h"], ceil["d2d"]
    lines = [f"device: {torch.cuda.get_device_name()}; ceilings (same run): pinned H2D {h2d:.1f} GB/s, "
             f"D2H {d2h:.1f} GB/s, D2D copy {d2d:.0f} GB/s; GPU CRC32C {crc['crc_GBps']:.0f} GB/s (bit-exact)"]
    if passes is not None:
        lines.append(f"host passes over 512 MiB on {passes['threads']} threads (4 MiB pieces): memset "
                     f"{passes['memset_GBps']:.1f} GB/s, non-temporal zero {passes['nt_zero_GBps']:.1f} GB/s, "
                     f"CRC32C {passes['crc_GBps']:.1f} GB/s")
    lines += [
             f"{'path [daemon]':52} {'store GB/s':>10} {'of D2H':>7} {'retrieve GB/s':>13} {'of H2D':>7}"]
    labels = (("ce", "gpu.store_cuda/retrieve_into_cuda, contiguous"), ("paged", "paged FA-NHD bs16, kernel+CE"),
              ("old", "KVStoreClient.store/retrieve_into (routed)"))
    for variant, rows in runs.items():
        for r in rows:
            if r is None:
                continue
            for tag, what in labels:
                if f"{tag}_store" in r:
                    lines.append(f"{r['shape'] + ' ' + what + ' [' + variant + ']':52} {_pct(r[tag + '_store'], d2h)} "
                                 f"{r[tag + '_retrieve']:13.1f} {r[tag + '_retrieve'] / h2d:7.0%}")
            lines.append(f"{r['shape'] + ' store wait=False, ' + str(r['streamed_calls']) + ' calls [' + variant + ']':52} "
                         f"{_pct(r['ce_store_streamed'], d2h)}  pool {r['pool']}")
    if big is not None:
        lines.append(f"{big['shape'] + ' x' + str(4 * args.chunks) + ' chunks, contiguous [stock]':52} "
                     f"{_pct(big['ce_store'], d2h)} {big['ce_retrieve']:13.1f} {big['ce_retrieve'] / h2d:7.0%}")
    for r in hbm_rows:
        lines.append(f"{r['shape'] + ' retrieve_into from the HBM tier (D2D)':52} {'':18} {r['hbm_GBps']:13.1f} "
                     f"{r['hbm_GBps'] / d2d:7.1%} of D2D ({r['hbm_GBps'] / h2d:.1f}x H2D); leased "
                     f"{r['hbm_leased_GBps']:.1f} GB/s ({r['hbm_leased_GBps'] / d2d:.1%}); first call (promotion) "
                     f"{r['first_GBps']:.1f} GB/s; tiers after {r['tiers']}; keys hashed by hashlib instead "
                     f"of kvs_prefix_keys (native {r['native_keys']}): {r['hbm_pykeys_GBps']:.1f} GB/s "
                     f"({r['hbm_pykeys_GBps'] / d2d:.1%})")
    stock = [r for r in runs.get("stock", []) if r is not None and "sm_gather_pcie_ms" in r]
    if stock:
        lines.append(f"{'SM time per chunk (ms)':52} {'chunk MB':>8} {'gather PCIe':>11} {'scatter PCIe':>12} "
                     f"{'gather D2D':>10} {'scatter D2D':>11} {'CE D2H (0 SM)':>13}")
    for r in stock:
        lines.append(f"{r['shape']:52} {r['chunk_MB']:8.1f} {r['sm_gather_pcie_ms']:11.3f} {r['sm_scatter_pcie_ms']:12.3f} "
                     f"{r['sm_gather_d2d_ms']:10.3f} {r['sm_scatter_d2d_ms']:11.3f} {r['ce_chunk_d2h_ms']:13.3f}")
    if crow:
        lines.append(f"{'compressed load (SmolLM2, GPU decode)':52} {'ratio':>6} {'eff. GB/s':>10} {'x H2D':>6} "
                     f"{'decode kernel GB/s':>18} {'x H2D':>6} {'GPU encode GB/s':>16} {'x D2H':>7} "
                     f"{'store_cuda(level) GB/s':>22} {'x D2H':>7}")
    for r in crow:
        lines.append(f"{'  level ' + str(r['level']):52} {r['ratio']:6.2f} {r['load_GBps']:10.1f} {r['load_GBps'] / h2d:6.2f} "
                     f"{r['decode_kernel_GBps']:18.1f} {r['decode_kernel_GBps'] / h2d:6.2f} "
                     f"{r['encode_GBps']:16.2f} {r['encode_GBps'] / d2h:7.2f} "
                     f"{r['store_encoded_GBps']:22.1f} {r['store_encoded_GBps'] / d2h:7.2f}")
    if hbm is not None:
        lines.append(f"HBM pool load alone (8 Llama chunks -> engine tensor, D2D): SM copy_rows {hbm['hbm_load_GBps']:.0f} "
                     f"GB/s = {hbm['hbm_load_GBps'] / d2d:.0%} of the D2D ceiling; copy-engine 2D "
                     f"{hbm['hbm_load_ce_GBps']:.0f} GB/s = {hbm['hbm_load_ce_GBps'] / d2d:.0%}; bit-exact {hbm['bit_exact']}")
    lines += [f"ERROR {e}" for e in errors]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(os.path.join(args.out, "gpu_all.txt"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "gpu_all.json"), "w") as f:
            json.dump({"ceilings": ceil, "crc": crc, "host_passes": passes, "e2e": runs, "e2e_x4": big, "codec": crow, "hbm_e2e": hbm_rows,
                       "hbm": hbm, "errors": errors}, f, indent=1)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
