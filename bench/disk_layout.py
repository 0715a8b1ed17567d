"""Disk layout benchmark: file per chunk + LMDB index (what ``DiskTier`` does) vs. values in LMDB.

Prints write MB/s (every chunk synced before the next, as a PERSISTED put is) and read MB/s
(with checksum verification) for real KV-chunk sizes, beside the ceiling of the same disk
measured in the same run: ``dd`` with ``conv=fsync`` and a plain Python write + fsync.

Reads are "cold" where the kernel honours ``posix_fadvise(DONTNEED)`` (clean pages are
dropped from the page cache), else warm; the table says which it measured.

    python bench/disk_layout.py --dir /path/on/the/disk/under/test [--total-mb 384]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np

from kvstore import config as cfg
import kvstore_native as native
from kvstore.tiers.base import PinTable
from kvstore.tiers.disk import DiskTier, encode_header
from kvstore.types import ChunkId, ChunkMeta, Encoding

MIB = 1024**2
#: 256 tokens of SmolLM2-135M KV in fp16: 30 layers x K,V x 256 x 3 heads x 64 dims x 2 bytes.
SMOLLM2_CHUNK_BYTES = 30 * 2 * 256 * 3 * 64 * 2
#: 256 tokens of Llama-3-8B-shaped KV in fp16: 32 layers x K,V x 256 x 8 heads x 128 dims x 2 bytes.
LLAMA3_8B_CHUNK_BYTES = 32 * 2 * 256 * 8 * 128 * 2
#: A CacheGen-compressed chunk (~6x smaller than SmolLM2 raw).
COMPRESSED_CHUNK_BYTES = 1 * MIB
SIZES = [("compressed 1 MiB", COMPRESSED_CHUNK_BYTES), ("SmolLM2 256 tok", SMOLLM2_CHUNK_BYTES),
         ("Llama-3-8B 256 tok", LLAMA3_8B_CHUNK_BYTES)]


def _drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _chunks(size: int, n: int):
    rng = np.random.default_rng(size)
    base = rng.bytes(size)
    out = []
    for i in range(n):
        data = bytearray(base)
        data[:8] = i.to_bytes(8, "little")          # distinct payloads, cheap to make
        cid = ChunkId(bytes(32) + rng.bytes(32))
        out.append((cid, ChunkMeta(256, Encoding.RAW, size, native.crc32c(data)), bytes(data)))
    return out


def bench_files(root: Path, chunks) -> tuple[float, float]:
    conf = cfg.DiskConfig(path=root, capacity_bytes=1 << 40, fsync=True, index_map_bytes=256 * MIB)
    t = DiskTier(conf, PinTable(time.time), time.time)
    nbytes = sum(m.payload_bytes for _, m, _ in chunks)
    t0 = time.perf_counter()
    for cid, meta, data in chunks:
        t.put(cid, meta, data)
    w = nbytes / (time.perf_counter() - t0) / MIB
    _drop_cache([p for p in (root / "chunks").rglob("*") if p.is_file()])
    t0 = time.perf_counter()
    for cid, _, _ in chunks:
        ref = t.get(cid)
        assert ref is not None
        ref.release()
    r = nbytes / (time.perf_counter() - t0) / MIB
    t.close()
    return w, r


def bench_lmdb_values(root: Path, chunks) -> tuple[float, float]:
    nbytes = sum(m.payload_bytes for _, m, _ in chunks)
    env = lmdb.open(str(root), map_size=4 * nbytes + 256 * MIB, sync=True, metasync=True)
    t0 = time.perf_counter()
    for cid, meta, data in chunks:
        with env.begin(write=True) as txn:
            txn.put(cid, encode_header(cid, meta) + data)
    w = nbytes / (time.perf_counter() - t0) / MIB
    _drop_cache([root / "data.mdb"])
    t0 = time.perf_counter()
    with env.begin(buffers=True) as txn:
        for cid, meta, _ in chunks:
            v = txn.get(cid)
            assert native.crc32c(v[len(v) - meta.payload_bytes:]) == meta.crc32c
    r = nbytes / (time.perf_counter() - t0) / MIB
    env.close()
    return w, r


def ceiling_dd(root: Path, total: int) -> float | None:
    if shutil.which("dd") is None:
        return None
    out = subprocess.run(["dd", "if=/dev/zero", f"of={root / 'dd.bin'}", "bs=4M", f"count={total // (4 * MIB)}",
                          "conv=fsync"], capture_output=True, text=True).stderr
    (root / "dd.bin").unlink(missing_ok=True)
    m = re.search(r"copied, ([0-9.]+) s", out)
    return total // (4 * MIB) * 4 * MIB / float(m.group(1)) / MIB if m else None


def ceiling_plain(root: Path, chunk: bytes, n: int) -> tuple[float, float]:
    """One plain file per chunk: write + fsync each, then read back (no index, no checksum)."""
    t0 = time.perf_counter()
    for i in range(n):
        with open(root / f"plain{i}", "wb") as f:
            f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    w = n * len(chunk) / (time.perf_counter() - t0) / MIB
    _drop_cache([root / f"plain{i}" for i in range(n)])
    t0 = time.perf_counter()
    for i in range(n):
        with open(root / f"plain{i}", "rb") as f:
            f.read()
    return w, n * len(chunk) / (time.perf_counter() - t0) / MIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="directory on the disk under test (default: a temp dir)")
    ap.add_argument("--total-mb", type=int, default=384, help="bytes written per case, MiB")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="kvstore-bench-", dir=args.dir))
    total = args.total_mb * MIB
    try:
        dd = ceiling_dd(base, total)
        print(f"disk under test: {base}  (dd bs=4M conv=fsync: "
              f"{'n/a' if dd is None else f'{dd:.0f} MiB/s'})")
        print(f"{'chunk':<20}{'n':>5}  {'layout':<26}{'write MiB/s':>12}{'read MiB/s':>12}")
        for name, size in SIZES:
            n = max(4, total // size)
            chunks = _chunks(size, n)
            rows = [("plain file+fsync (ceil)", ceiling_plain(base / f"p{size}", chunks[0][2], n)
                     if (base / f"p{size}").mkdir() is None else None),
                    ("file/chunk + LMDB index", bench_files(base / f"f{size}", chunks)),
                    ("values in LMDB", bench_lmdb_values(base / f"l{size}", chunks))]
            for layout, (w, r) in rows:
                print(f"{name:<20}{n:>5}  {layout:<26}{w:>12.0f}{r:>12.0f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
