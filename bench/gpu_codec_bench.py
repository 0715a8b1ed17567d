"""Batched GPU codec: bit-exactness with the CPU codec, then speed beside the pinned PCIe H2D
ceiling measured in the same run (issue 12 item 2).

Run on a CUDA machine from the repository root (libraries built):

    python3 bench/gpu_codec_bench.py --kv-npy smol_kv_1024.npy [--chunks 16] [--json out.json]

``--kv-npy``: real SmolLM2 KV, fp16 or fp32 ``[30, 2, T, 3, 64]`` (T a multiple of 256; saved on
a CPU machine with ``kvstore_testing.smollm2.compute_kv``); without it KV-like synthetic data.
The Llama-3-8B-shaped bf16 chunks are synthetic (``kvstore_testing.codec_data.synthetic_kv``).
Rates are decoded (or encoded) fp16/bf16 bytes per second. Exit status 0 only if every
bit-exactness check passes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvstore_native as native  # noqa: E402
import kvstore_native.codec as kc  # noqa: E402
from kvstore_native.codec import gpu  # noqa: E402
from kvstore_testing.codec_data import fix_checksums, synthetic_kv  # noqa: E402

LOSSY = [kc.CodecLevel.NEAR_LOSSLESS, kc.CodecLevel.DEFAULT, kc.CodecLevel.AGGRESSIVE]
CHUNK_TOKENS = 256
H2D_BYTES = 256 << 20
VARIANTS = [("first", 4), ("warp-smem", 4), ("warp-smem-hw", 2), ("warp-smem-hw", 4), ("warp-smem-hw", 8),
            ("warp-global", 4), ("warp-global-hw", 4), ("warp-smem-hw-short", 4), ("warp-smem-hw-short", 8)]
DEFAULT = ("warp-smem-hw-short", 4)
#: Decoders timed in the mapped load (what the client's compressed loads call), the default first.
MAPPED_VARIANTS = [DEFAULT, ("warp-smem-hw", 4)]
#: Statistics passes of the batched encoder (gpu.ENCODERS), the default first.
ENCODERS = ["tile", "global"]


def bf16_bits(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def to_dev(torch, a: np.ndarray, bf16: bool):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t.view(torch.bfloat16) if bf16 else t).cuda()


def bits(torch, t) -> bytes:
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).cpu().numpy().tobytes()


def ev_ms(torch, fn, reps: int) -> float:
    """Median ms of fn() between CUDA events on the current stream (fn may synchronize)."""
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def wall_ms(torch, fn, reps: int) -> float:
    """Median wall ms of fn() followed by a device synchronize."""
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def h2d_ceiling(torch, reps: int) -> float:
    big = torch.empty(H2D_BYTES, dtype=torch.uint8).pin_memory()
    dbig = torch.empty(H2D_BYTES, dtype=torch.uint8, device="cuda")
    return H2D_BYTES / ev_ms(torch, lambda: dbig.copy_(big, non_blocking=True), reps) / 1e6


# ---- data ------------------------------------------------------------------------------------

def smol_chunks(path: str | None, count: int) -> tuple[str, list[np.ndarray]]:
    """``count`` distinct fp16 SmolLM2 chunks of 256 tokens (windows of the real KV, negated and
    token-reversed copies when more are needed)."""
    if path:
        kv = np.load(path).astype(np.float16)
        src = f"real SmolLM2-135M KV ({path})"
    else:
        kv = synthetic_kv(30, 1024, 3, 64, seed=1, dtype=np.float16)
        src = "KV-like synthetic (SmolLM2 shape)"
    wins = [kv[:, :, i:i + CHUNK_TOKENS] for i in range(0, kv.shape[2] - CHUNK_TOKENS + 1, CHUNK_TOKENS)]
    forms = [lambda w: w, lambda w: -w, lambda w: w[:, :, ::-1], lambda w: -w[:, :, ::-1]]
    out = [np.ascontiguousarray(f(w)) for f in forms for w in wins]
    while len(out) < count:
        out += [np.ascontiguousarray(o * np.float16(0.5)) for o in out]
    return src, out[:count]


def llama_chunks(count: int) -> list[np.ndarray]:
    return [bf16_bits(synthetic_kv(32, CHUNK_TOKENS, 8, 128, seed=100 + i, dtype=np.float32)) for i in range(count)]


# ---- bit-exactness ---------------------------------------------------------------------------

def exact_cases(smol: list[np.ndarray]):
    rng = np.random.default_rng(0)
    yield "smol f16", smol[:3], kc.Layout.KV, False
    yield "smol bf16", [bf16_bits(c.astype(np.float32)) for c in smol[:2]], kc.Layout.KV, True
    yield "llama bf16", llama_chunks(2), kc.Layout.KV, True
    x = rng.normal(0, 1, (2, 2, 32, 2, 16)).astype(np.float32)
    x.flat[::97], x.flat[5::89], x.flat[7::83] = np.nan, np.inf, -np.inf
    yield "nan/inf f32", [x, -x], kc.Layout.KV, False
    z = np.zeros((2, 2, 64, 3, 64), np.float16)
    yield "zeros/constant f16", [z, z + np.float16(0.75)], kc.Layout.KV, False
    yield "mla f16", [rng.normal(0, 1, (6, 256, 576)).astype(np.float16) for _ in range(2)], kc.Layout.MLA, False
    yield "odd shape f16", [rng.normal(0, 3, (3, 2, 7, 1, 5)).astype(np.float16) for _ in range(2)], kc.Layout.KV, False


def check_exact(torch, smol) -> bool:
    ok = True
    for name, hosts, layout, bf16 in exact_cases(smol):
        for level in LOSSY:
            cpu = [kc.encode(h, level, layout, bf16=bf16, threads=8) for h in hosts]
            ref = [np.ascontiguousarray(kc.decode(b, threads=8)).tobytes() for b in cpu]
            devs = [to_dev(torch, h, bf16) for h in hosts]
            enc_one = all(gpu.encode(d, level, layout) == c for d, c in zip(devs, cpu))
            enc_batch = gpu.encode_batch(devs, level, layout) == cpu
            dec = {}
            for v, w in VARIANTS:
                gpu.set_decoder(v, w)
                outs = [torch.empty_like(d) for d in devs]
                for o in outs:
                    o.view(torch.uint8).fill_(0xA5)  # poisoned: every element must be written
                gpu.decode_batch(cpu, outs)
                dec[f"{v}/{w}"] = all(bits(torch, o) == r for o, r in zip(outs, ref))
            gpu.set_decoder(*DEFAULT)
            outs = [torch.empty_like(d) for d in devs]
            pinned = [torch.frombuffer(bytearray(b), dtype=torch.uint8).pin_memory() for b in cpu]
            gpu.load_batch(pinned, outs, groups=2, verify=True)
            load = all(bits(torch, o) == r for o, r in zip(outs, ref))
            good = enc_one and enc_batch and all(dec.values()) and load
            ok &= good
            bad = [k for k, v in dec.items() if not v]
            print(f"  {name:18s} {level.name:14s} encode(one)={enc_one} encode(batch)={enc_batch} "
                  f"decoders={'all' if not bad else 'FAIL ' + ','.join(bad)} load={load} "
                  f"{'OK' if good else 'MISMATCH'}", flush=True)
    # hostile input through every decoder: raise or decode garbage, never crash the context
    a = synthetic_kv(4, 64, 3, 64)
    b = kc.encode(a, kc.CodecLevel.DEFAULT)
    rng = np.random.default_rng(5)
    muts = []
    for _ in range(150):
        m = bytearray(b)
        for pos in rng.integers(64 + 16 * 4, len(b), 3):
            m[pos] ^= int(rng.integers(1, 256))
        muts.append(fix_checksums(bytes(m)))
    out = torch.empty(a.shape, dtype=torch.float16, device="cuda")
    for v, w in VARIANTS:
        gpu.set_decoder(v, w)
        rej = 0
        for m in muts:
            try:
                gpu.decode_batch([m], [out])
            except kc.CodecError:
                rej += 1
        torch.cuda.synchronize()
        print(f"  hostile streams, decoder {v}/{w}: {rej} of {len(muts)} rejected, context alive")
    gpu.set_decoder(*DEFAULT)
    return ok


# ---- speed -----------------------------------------------------------------------------------

def speed(torch, name: str, hosts: list[np.ndarray], bf16: bool, h2d: float, reps: int, lanes: int = 32) -> list[dict]:
    nb = hosts[0].nbytes
    n = len(hosts)
    total = n * nb
    devs = [to_dev(torch, h, bf16) for h in hosts]
    s = torch.cuda.current_stream().cuda_stream
    rows = []
    for level in LOSSY:
        blobs = [kc.encode(h, level, bf16=bf16, threads=8, lanes=lanes) for h in hosts]
        ref0 = np.ascontiguousarray(kc.decode(blobs[0], threads=8)).tobytes()
        ratio = total / sum(len(b) for b in blobs)
        dev_b = [torch.frombuffer(bytearray(b), dtype=torch.uint8).cuda() for b in blobs]
        host_b = [torch.frombuffer(bytearray(b), dtype=torch.uint8).pin_memory() for b in blobs]
        outs = torch.empty((n, nb), dtype=torch.uint8, device="cuda")
        optrs = [int(outs[j].data_ptr()) for j in range(n)]
        hptrs, lens = [int(h.data_ptr()) for h in host_b], [len(b) for b in blobs]
        row = {"shape": name, "level": level.name, "chunks": n, "lanes": lanes, "ratio": ratio, "h2d_GBps": h2d}
        for v, w in VARIANTS:
            gpu.set_decoder(v, w)
            ms = ev_ms(torch, lambda: gpu.decode_batch_ptrs(hptrs, [int(d.data_ptr()) for d in dev_b], lens, optrs,
                                                            nb, s), reps)
            row[f"decode_{v}_{w}_GBps"] = total / ms / 1e6
        ok_dec = outs[0].cpu().numpy().tobytes() == ref0
        gpu.set_decoder(*DEFAULT)
        dbuf = [torch.empty(len(b), dtype=torch.uint8, device="cuda") for b in blobs]

        def h2d_only():
            for d, h in zip(dbuf, host_b):
                d.copy_(h, non_blocking=True)
        row["bitstream_h2d_GBps"] = total / ev_ms(torch, h2d_only, reps) / 1e6
        for g in (0, 1, 2, 4):  # 0: the default (one group per decoder wave)
            if g > n:
                continue
            outs.fill_(0xA5)
            ms = wall_ms(torch, lambda: gpu.load_batch_ptrs(hptrs, lens, optrs, nb, s, groups=g), reps)
            row[f"load_g{g}_GBps"] = total / ms / 1e6
        ok_load = all(outs[j].cpu().numpy().tobytes() == np.ascontiguousarray(kc.decode(blobs[j], threads=8)).tobytes()
                      for j in range(n))
        ms = wall_ms(torch, lambda: gpu.load_batch_ptrs(hptrs, lens, optrs, nb, s, verify=True), reps)
        row["load_verify_GBps"] = total / ms / 1e6
        # The mapped load (kvs_cuda_codec_load_mapped: what the client's compressed loads call):
        # CRC-gated, decoded straight into the chunks' places.
        L_, _, T_, H_, D_ = hosts[0].shape
        row_b = T_ * H_ * D_ * 2
        planes = np.array([[o + p * row_b for p in range(2 * L_)] for o in optrs], dtype=np.uint64)
        dmap = gpu.DecodeMap(planes, np.broadcast_to(np.arange(T_, dtype=np.uint64) * (H_ * D_ * 2), (n, T_)), H_ * D_, 0)
        crcs = [native.crc32c(b) for b in blobs]
        dt = kc.DType.BFLOAT16 if bf16 else kc.DType.FLOAT16
        ok_mapped = True
        times: dict = {}
        for v, w in MAPPED_VARIANTS + MAPPED_VARIANTS[::-1]:   # A B B A: no variant always runs first
            gpu.set_decoder(v, w)
            outs.fill_(0xA5)
            times.setdefault((v, w), []).append(wall_ms(torch, lambda: gpu.load_mapped(
                hptrs, lens, dt, kc.Layout.KV, (L_, T_, H_, D_), dmap, s, want_crcs=crcs), reps))
            ok_mapped &= all(outs[j].cpu().numpy().tobytes() ==
                             np.ascontiguousarray(kc.decode(blobs[j], threads=8)).tobytes() for j in range(n))
        for v, w in MAPPED_VARIANTS:   # the default first: "mapped_GBps" is its rate
            row.setdefault("mapped_GBps", total / statistics.mean(times[(v, w)]) / 1e6)
            row[f"mapped_{v}_{w}_GBps"] = total / statistics.mean(times[(v, w)]) / 1e6
        gpu.set_decoder(*DEFAULT)
        ms = wall_ms(torch, lambda: gpu.encode(devs[0], level, lanes=lanes), max(3, reps // 3))
        row["encode_one_GBps"] = nb / ms / 1e6
        out = torch.empty(gpu.encode_bound_batch(devs[0], n, level), dtype=torch.uint8).pin_memory()
        ok_enc = True
        times = {}
        for enc in ENCODERS + ENCODERS[::-1]:   # A B B A
            gpu.set_encoder(enc)
            spans = gpu.encode_batch_into(devs, level, out, lanes=lanes)
            ok_enc &= all(out[o:o + z].numpy().tobytes() == b for (o, z), b in zip(spans, blobs))
            times.setdefault(enc, []).append(wall_ms(torch, lambda: gpu.encode_batch_into(devs, level, out, lanes=lanes),
                                                     reps))
        for enc in ENCODERS:   # the default first: "encode_batch_GBps" is its rate
            row.setdefault("encode_batch_GBps", total / statistics.mean(times[enc]) / 1e6)
            row[f"encode_batch_{enc}_GBps"] = total / statistics.mean(times[enc]) / 1e6
        gpu.set_encoder(ENCODERS[0])
        row["exact"] = bool(ok_dec and ok_load and ok_enc and ok_mapped)
        rows.append(row)
        best = max((k for k in row if k.startswith("decode_")), key=lambda k: row[k])
        bestl = "load_g0_GBps"  # the default grouping is what callers get
        print(f"  {name} {level.name} lanes {lanes}: ratio {ratio:.2f}x; decode best {best} {row[best]:.1f} GB/s "
              f"({row[best] / h2d:.2f}x H2D), first {row['decode_first_4_GBps']:.1f}; load {bestl} "
              f"{row[bestl]:.1f} GB/s ({row[bestl] / h2d:.2f}x H2D), verify {row['load_verify_GBps']:.1f}; "
              f"mapped (CRC-gated, into place) {row['mapped_GBps']:.1f} GB/s ({row['mapped_GBps'] / h2d:.2f}x H2D, "
              f"exact {ok_mapped}; by decoder " + ", ".join(
                  f"{v}/{w} {row[f'mapped_{v}_{w}_GBps']:.1f}" for v, w in MAPPED_VARIANTS) + "); "
              f"bitstream H2D {row['bitstream_h2d_GBps']:.1f}; encode one {row['encode_one_GBps']:.2f}, batch "
              f"{row['encode_batch_GBps']:.1f} GB/s ({row['encode_batch_GBps'] / h2d:.2f}x H2D; by encoder " +
              ", ".join(f"{x} {row[f'encode_batch_{x}_GBps']:.1f}" for x in ENCODERS) + "); "
              f"exact dec={ok_dec} load={ok_load} enc={ok_enc}", flush=True)
        del dev_b, host_b, outs, dbuf, out
    return rows


def scaling(torch, hosts: list[np.ndarray], h2d: float, reps: int, sizes=(16, 32, 64), lanes: int = 32) -> None:
    """Decode call and compressed load of larger batches (level 2; the 16 bitstreams repeated in
    distinct buffers): the decoder is latency-bound until a batch fills the GPU."""
    nb = hosts[0].nbytes
    blobs = [kc.encode(h, kc.CodecLevel.DEFAULT, threads=8, lanes=lanes) for h in hosts]
    s = torch.cuda.current_stream().cuda_stream
    gpu.set_decoder(*DEFAULT)
    for n in sizes:
        bl = [blobs[i % len(blobs)] for i in range(n)]
        dev_b = [torch.frombuffer(bytearray(b), dtype=torch.uint8).cuda() for b in bl]
        host_b = [torch.frombuffer(bytearray(b), dtype=torch.uint8).pin_memory() for b in bl]
        outs = torch.empty((n, nb), dtype=torch.uint8, device="cuda")
        optrs = [int(outs[j].data_ptr()) for j in range(n)]
        hptrs, lens = [int(h.data_ptr()) for h in host_b], [len(b) for b in bl]
        dms = ev_ms(torch, lambda: gpu.decode_batch_ptrs(hptrs, [int(d.data_ptr()) for d in dev_b], lens, optrs, nb, s),
                    reps)
        lms = wall_ms(torch, lambda: gpu.load_batch_ptrs(hptrs, lens, optrs, nb, s), reps)
        ok = outs[n - 1].cpu().numpy().tobytes() == np.ascontiguousarray(kc.decode(bl[n - 1])).tobytes()
        L_, _, T_, H_, D_ = hosts[0].shape
        row_b = T_ * H_ * D_ * 2
        planes = np.array([[o + p * row_b for p in range(2 * L_)] for o in optrs], dtype=np.uint64)
        dmap = gpu.DecodeMap(planes, np.broadcast_to(np.arange(T_, dtype=np.uint64) * (H_ * D_ * 2), (n, T_)), H_ * D_, 0)
        crcs = [native.crc32c(b) for b in bl]
        mapped = {}
        for g in (0, 2, 4):  # 0: the default grouping
            mapped[g] = wall_ms(torch, lambda: gpu.load_mapped(hptrs, lens, kc.DType.FLOAT16, kc.Layout.KV, (L_, T_, H_, D_),
                                                               dmap, s, want_crcs=crcs, groups=g), reps)
        ok &= outs[n - 1].cpu().numpy().tobytes() == np.ascontiguousarray(kc.decode(bl[n - 1])).tobytes()
        print(f"  scaling DEFAULT lanes {lanes} x{n}: decode call {n * nb / dms / 1e6:.1f} GB/s ({n * nb / dms / 1e6 / h2d:.2f}x H2D), "
              f"load {n * nb / lms / 1e6:.1f} GB/s ({n * nb / lms / 1e6 / h2d:.2f}x H2D), mapped (CRC-gated) by groups " +
              ", ".join(f"{g or 'default'} {n * nb / ms / 1e6:.1f} ({n * nb / ms / 1e6 / h2d:.2f}x)" for g, ms in mapped.items()) +
              f" exact={ok}", flush=True)
        del dev_b, host_b, outs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv-npy", default=None)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--llama-chunks", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--lanes", default="32", help="lane counts to time, comma-separated (32, 64, 128)")
    args = ap.parse_args()
    lane_counts = [int(x) for x in args.lanes.split(",")]
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 2
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    h2d = h2d_ceiling(torch, args.reps)
    print(f"pinned H2D ceiling: {h2d:.1f} GB/s (256 MiB copies)", flush=True)
    f16_bad, bf16_bad = gpu.selftest_conversions()
    print(f"hardware cvt vs portable conversion, all non-NaN binary32: f16 {f16_bad}, bf16 {bf16_bad} differ")
    src, smol = smol_chunks(args.kv_npy, args.chunks)
    print(f"data: {src}", flush=True)
    ok = True
    if not args.skip_exact:
        print("bit-exactness CPU <-> GPU (encode one/batch, every decoder, pipelined load):", flush=True)
        ok = check_exact(torch, smol)
    rows = []
    llama = llama_chunks(args.llama_chunks)
    for lanes in lane_counts:  # each lane count's rows in the same run, against the same ceiling
        rows += speed(torch, "SmolLM2 fp16", smol, False, h2d, args.reps, lanes)
        rows += speed(torch, "Llama-3-8B bf16", llama, True, h2d, args.reps, lanes)
    for lanes in lane_counts:
        scaling(torch, smol, h2d, args.reps, lanes=lanes)
    h2d_end = h2d_ceiling(torch, args.reps)
    print(f"pinned H2D ceiling at the end: {h2d_end:.1f} GB/s")
    print("\n| shape | lanes | level | ratio | decode kernel GB/s (best variant) | x H2D | load GB/s | x H2D | "
          "mapped load GB/s | x H2D | encode batch GB/s | x H2D | encode one chunk GB/s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        d = max(v for k, v in r.items() if k.startswith("decode_"))
        lo = r["load_g0_GBps"]
        print(f"| {r['shape']} x{r['chunks']} | {r['lanes']} | {r['level']} | {r['ratio']:.2f}x | {d:.1f} | {d / h2d:.2f} | {lo:.1f} | "
              f"{lo / h2d:.2f} | {r['mapped_GBps']:.1f} | {r['mapped_GBps'] / h2d:.2f} | {r['encode_batch_GBps']:.1f} | {r['encode_batch_GBps'] / h2d:.2f} | "
              f"{r['encode_one_GBps']:.2f} |")
    ok &= all(r["exact"] for r in rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"h2d_GBps": [h2d, h2d_end], "rows": rows,
                                               "cvt_mismatch": [f16_bad, bf16_bad]}, indent=1))
    print("\nALL BIT-EXACT" if ok else "\nBIT-EXACTNESS FAILURES (see MISMATCH / False above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
