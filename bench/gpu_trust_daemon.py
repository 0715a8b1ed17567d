"""Variant launcher for the GPU benchmarks (bench/gpu_all.py, bench/gpu_probe.py): the real
daemon with one change, chosen by ``KVSTORE_BENCH_VARIANT``, so each variant is measured
in the same run as the shipped code. Benchmarks label these numbers with the variant.

- ``trust`` (default): CommitWrite takes the client's CRC32Cs (computed on the GPU by
  kvstore_client.gpu) instead of reading every committed byte again on the CPU, for every
  caller (what a token with ``trust_client_crc = true`` gets; this runs with auth off).
- ``memset``: reserved extents cleared by a plain memset, as before ``kvs_zero`` (non-temporal
  stores).
- ``serial``: the same-host path as before the parallel verification (issue 12): checksum and
  zero threads = server.worker_threads, one thread per extent.

Usage: KVSTORE_BENCH_VARIANT=serial python bench/gpu_trust_daemon.py serve ...
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

from kvstore.cli import daemon
from kvstore.store import local
from kvstore.store.crc_parallel import PieceCrc

#: "One piece per extent" for the serial variant (larger than any chunk).
WHOLE_EXTENT_BYTES = 1 << 40

VARIANT = os.environ.get("KVSTORE_BENCH_VARIANT", "trust")
_orig_commit_many = local.LocalAccess.commit_many
_orig_init = local.LocalAccess.__init__


def _commit_trusting(self, reservations, crcs, durability, trust_crcs=False):
    """Every caller is treated as a principal with ``trust_client_crc`` (the shipped code path)."""
    return _orig_commit_many(self, reservations, crcs, durability, True)


def _init_serial(self, chain, index_path, crc_threads):
    _orig_init(self, chain, index_path, crc_threads)
    self._crc_pool.shutdown(wait=True)
    self._crc_pool = ThreadPoolExecutor(crc_threads, thread_name_prefix="kvstore-crc")
    self._piece_crc = PieceCrc(WHOLE_EXTENT_BYTES)


def _zero_by_memset(view) -> None:
    """How extents were cleared before ``kvs_zero``: a plain memset (GIL released)."""
    import ctypes

    import numpy as np
    if view.nbytes:
        ctypes.memset(np.frombuffer(view, dtype=np.uint8).ctypes.data, 0, view.nbytes)


if VARIANT == "memset":
    local.native = type("_Native", (), {"zero": staticmethod(_zero_by_memset)})
elif VARIANT == "trust":
    local.LocalAccess.commit_many = _commit_trusting
elif VARIANT == "serial":
    local.LocalAccess.__init__ = _init_serial
    local.PIECE_BYTES = WHOLE_EXTENT_BYTES
else:
    raise SystemExit(f"KVSTORE_BENCH_VARIANT={VARIANT!r}: use memset, trust or serial")

if __name__ == "__main__":
    sys.exit(daemon.main())
