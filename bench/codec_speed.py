"""CPU speed of the KV codec (one thread, one core) beside zstd and constriction, same run.

    python bench/codec_speed.py [--reps 7] [--kv-npy smol_kv_1024.npy] [--lanes 32,64,128]

Data: one 256-token SmolLM2-135M KV chunk (fp16, [30, 2, 256, 3, 64], 5.9 MB) from the
quality harness cache when present, else KV-like synthetic data. MB/s are of fp16 KV bytes
(input of encode, output of decode); medians over --reps runs.
Baselines: zstd (levels 3, 19, 22) on the same fp16 bytes; constriction's ANS coder
(categorical model, order 0) on the same symbols as the lossless mode's coded plane.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvstore_native.codec as kc  # noqa: E402
from kvstore_testing.codec_data import synthetic_kv  # noqa: E402


def load_chunk(npy: str | None = None) -> tuple[str, np.ndarray]:
    if npy:  # real KV [30, 2, T, 3, 64]: its first 256 tokens
        return f"{npy} (tokens 0-255)", np.ascontiguousarray(np.load(npy)[:, :, :256].astype(np.float16))
    files = sorted(glob.glob("/tmp/kvstore_quality_cache/*.npz"))
    if files:
        kv = np.load(files[0])["kv"][:, :, 256:512]
        return "SmolLM2-135M KV (quality-harness cache)", np.ascontiguousarray(kv.astype(np.float16))
    return "synthetic KV-like", synthetic_kv(30, 256, 3, 64)


def med(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--kv-npy", default=None, help="real KV as a .npy [30, 2, T, 3, 64] (fp16 or fp32)")
    ap.add_argument("--lanes", default="32", help="lane counts of the lossy rows, comma-separated (32, 64, 128)")
    args = ap.parse_args()
    lane_counts = [int(v) for v in args.lanes.split(",")]
    src, x = load_chunk(args.kv_npy)
    nb = x.nbytes
    print(f"data: {src}, {x.shape} fp16, {nb / 1e6:.2f} MB; one thread; medians of {args.reps}\n")
    print("| codec | bits/elem | ratio | encode MB/s | decode MB/s |")
    print("|---|---:|---:|---:|---:|")
    for level in kc.CodecLevel:
        for lanes in lane_counts if level != kc.CodecLevel.LOSSLESS else [32]:
            # the default count goes without the argument: the script also times libraries before it
            kw = {} if lanes == 32 else {"lanes": lanes}
            b = kc.encode(x, level, **kw)
            te = med(lambda: kc.encode(x, level, **kw), args.reps)
            out = np.empty_like(x)
            td = med(lambda: kc.decode_into(b, out), args.reps)
            name = level.name.lower() + ("" if len(lane_counts) == 1 else f", {lanes} lanes")
            print(f"| kvstore {name} | {len(b) * 8 / x.size:.3f} | {nb / len(b):.2f}x | "
                  f"{nb / te / 1e6:.0f} | {nb / td / 1e6:.0f} |")
    import os

    threads = os.cpu_count() or 1
    if threads > 1:
        b = kc.encode(x, kc.CodecLevel.DEFAULT)
        out = np.empty_like(x)
        te = med(lambda: kc.encode(x, kc.CodecLevel.DEFAULT, threads=threads), args.reps)
        td = med(lambda: kc.decode_into(b, out, threads=threads), args.reps)
        print(f"| kvstore default, {threads} threads (layers in parallel) | {len(b) * 8 / x.size:.3f} | "
              f"{nb / len(b):.2f}x | {nb / te / 1e6:.0f} | {nb / td / 1e6:.0f} |")
    try:
        import zstandard

        raw = x.tobytes()
        for lvl in (3, 19, 22):
            c = zstandard.ZstdCompressor(level=lvl)
            z = c.compress(raw)
            d = zstandard.ZstdDecompressor()
            te = med(lambda: c.compress(raw), max(1, args.reps // 3) if lvl >= 19 else args.reps)
            td = med(lambda: d.decompress(z), args.reps)
            print(f"| zstd -{lvl} | {len(z) * 8 / x.size:.3f} | {nb / len(z):.2f}x | {nb / te / 1e6:.0f} | {nb / td / 1e6:.0f} |")
    except ImportError:
        print("| zstd | (zstandard not installed) | | | |")
    try:
        import constriction

        hi = (x.view(np.uint16) >> 8).astype(np.int32).ravel()
        counts = np.bincount(hi, minlength=256).astype(np.float64)
        model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)

        def enc():
            coder = constriction.stream.stack.AnsCoder()
            coder.encode_reverse(hi, model)
            return coder.get_compressed()

        comp = enc()
        te = med(enc, args.reps)
        td = med(lambda: constriction.stream.stack.AnsCoder(comp).decode(model, hi.size), args.reps)
        bits = comp.size * 32 / hi.size
        # the same symbols through kvstore: lossless mode codes this plane (plus a raw plane)
        b = kc.encode(x, kc.CodecLevel.LOSSLESS)
        out = np.empty_like(x)
        tk = med(lambda: kc.decode_into(b, out), args.reps)
        print(f"\nsame symbols (fp16 high-byte plane, {hi.size} symbols, order-0):")
        print(f"| coder | bits/symbol | encode Msym/s | decode Msym/s |")
        print(f"|---|---:|---:|---:|")
        print(f"| constriction AnsCoder (Categorical) | {bits:.3f} | {hi.size / te / 1e6:.1f} | {hi.size / td / 1e6:.1f} |")
        print(f"| kvstore lossless (this plane + 1 raw plane) | - | - | {hi.size / tk / 1e6:.1f} |")
    except ImportError:
        print("(constriction not installed: pip install constriction)")


if __name__ == "__main__":
    main()
