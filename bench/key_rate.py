"""Prefix-key hashing rate: ``prefix_keys`` of N tokens through kvstore-native's
``kvs_prefix_keys`` against hashlib's chain (the baseline), from a Python list and from an
integer numpy array, beside the ceiling measured in the same run: one BLAKE2b-256 call over
the same packed bytes (the chain hashes exactly these bytes plus 36 per chunk, and cannot
run in parallel: each key hashes the one before it). Medians of ``--reps`` timed rounds.

    python bench/key_rate.py [--tokens 4096 16384] [--chunk 256] [--reps 7]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import numpy as np

import kvstore_wire.keys as keys


def _us(fn, calls: int, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        ts.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    native = keys._native_chain
    if native is None:
        print("kvstore-native not loaded: only hashlib's chain")
    nsid = bytes(range(32))
    print(f"{'tokens':>7} {'container':>9} {'hashlib us':>11} {'native us':>10} {'speedup':>8} "
          f"{'one BLAKE2b us (ceiling)':>25}")
    for n in args.tokens:
        ids = [(i * 2654435761) % 49152 for i in range(n)]
        packed = np.asarray(ids, dtype="<u4").tobytes()
        calls = max(20, 400_000 // n)
        ceiling = _us(lambda: hashlib.blake2b(packed, digest_size=32).digest(), calls, args.reps)
        for name, toks in (("list", ids), ("numpy", np.asarray(ids, dtype=np.int32))):
            def run():
                return keys.prefix_keys(nsid, toks, args.chunk)
            keys._native_chain = None
            try:
                base, want = _us(run, calls, args.reps), run()
            finally:
                keys._native_chain = native
            fast = _us(run, calls, args.reps) if native is not None else float("nan")
            if native is not None:
                assert run() == want, "native chain differs from hashlib's"
            print(f"{n:7d} {name:>9} {base:11.1f} {fast:10.1f} {base / fast:7.2f}x {ceiling:25.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
