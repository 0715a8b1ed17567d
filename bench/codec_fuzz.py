"""Long fuzz campaign of the codec decoder (the CI test is the bounded hypothesis version).

Mutates valid bitstreams of every level and layout (byte edits, bit flips, truncation,
splices, header-field edits), recomputes the CRCs half of the time so mutations reach the
segment decoders, and decodes with and without CRC verification. Any exception other than
CodecError, or a crash, is a failure.

    python bench/codec_fuzz.py --seconds 600
    # under AddressSanitizer + UBSan:
    (cd native && KVSTORE_NATIVE_SANITIZE=1 python setup.py -q --name)
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \\
      KVSTORE_NATIVE_LIB=native/kvstore_native/_lib/libkvstore_asan.so python bench/codec_fuzz.py --seconds 300
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvstore_native.codec as kc  # noqa: E402
from kvstore_testing.codec_data import fix_checksums, synthetic_kv  # noqa: E402


def seeds() -> list[bytes]:
    out = []
    for i, (L, T, H, D) in enumerate([(3, 24, 2, 20), (2, 64, 3, 64), (1, 5, 1, 3), (2, 40, 1, 33)]):
        x = synthetic_kv(L, T, H, D, seed=i)
        x[0, :, 0] *= 0.001  # sink-like token -> raw rows
        for level in kc.CodecLevel:
            out.append(kc.encode(x, level))
            out.append(kc.encode(x.astype(np.float32), level))
        out.append(kc.encode(x.reshape(L, 2 * T, H * D), kc.CodecLevel.DEFAULT, kc.Layout.MLA))
        out.append(kc.encode(x.reshape(L, 2 * T, H * D), kc.CodecLevel.LOSSLESS, kc.Layout.MLA))
        for lanes in (64, 128):  # wider lane tables (and fewer lanes than that where C is small)
            out.append(kc.encode(x, kc.CodecLevel.DEFAULT, lanes=lanes))
            out.append(kc.encode(x.astype(np.float32), kc.CodecLevel.AGGRESSIVE, lanes=lanes))
    return out


def mutate(b: bytes, rng: np.random.Generator, pool: list[bytes]) -> bytes:
    m = bytearray(b)
    op = rng.integers(0, 7)
    if op == 0:
        for _ in range(rng.integers(1, 8)):
            m[rng.integers(0, len(m))] = rng.integers(0, 256)
    elif op == 1:
        for _ in range(rng.integers(1, 8)):
            m[rng.integers(0, len(m))] ^= 1 << int(rng.integers(0, 8))
    elif op == 2:
        m = m[: rng.integers(0, len(m) + 1)]
    elif op == 3:
        other = pool[rng.integers(0, len(pool))]
        cut = rng.integers(0, min(len(m), len(other)) + 1)
        m = m[:cut] + bytearray(other[cut:])
    elif op == 4:  # header field edits
        off, fmt = [(12, "<I"), (16, "<I"), (20, "<I"), (24, "<I"), (36, "<Q"), (9, "<B"), (10, "<B"), (11, "<B"),
                    (33, "<B")][rng.integers(0, 9)]
        struct.pack_into(fmt, m, off, int(rng.integers(0, 1 << 32)) % (1 << (8 * struct.calcsize(fmt))))
    elif op == 5 and len(m) > 64:  # u32 edits inside the payload (lane lengths, states, indices)
        pos = int(rng.integers(64, len(m) - 3))
        struct.pack_into("<I", m, pos, int(rng.choice([0, 1, 5, 1 << 23, (1 << 31) - 1, 0xFFFFFFFF, rng.integers(0, 1 << 32)])))
    else:  # insert or delete bytes
        pos = int(rng.integers(0, len(m) + 1))
        if rng.random() < 0.5:
            m[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
        else:
            del m[pos: pos + int(rng.integers(1, 16))]
    return bytes(m)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    pool = seeds()
    n = rejected = decoded = 0
    t0 = time.time()
    while time.time() - t0 < args.seconds:
        b = mutate(pool[rng.integers(0, len(pool))], rng, pool)
        if rng.random() < 0.5:
            b = fix_checksums(b)
        for verify in (True, False):
            try:
                kc.decode(b, verify=verify, max_decoded_bytes=1 << 24)
                decoded += 1
            except kc.CodecError:
                rejected += 1
        n += 1
    dt = time.time() - t0
    print(f"fuzz: {n} mutated streams x 2 decodes in {dt:.0f} s: {rejected} rejected with CodecError, "
          f"{decoded} decoded (mutation kept the stream valid), 0 crashes / other exceptions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
