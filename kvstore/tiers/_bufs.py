"""Zero-copy native CRC32C and memcpy over any contiguous buffer, read-only ones included.

``kvstore.native`` copies a read-only buffer that is not a whole ``bytes`` object (e.g. a
read-only arena view) before passing it to C; the tiers checksum and copy exactly such views,
so they take the address through numpy instead, which needs no copy. The GIL is released for
the duration of each native call (ctypes).
"""

from __future__ import annotations

import numpy as np

from .. import native

#: Threads one native copy may use; copies run on worker threads already, so one each.
COPY_THREADS = 1


def _addr(buf) -> tuple[int, int, object]:
    mv = memoryview(buf)
    if not mv.contiguous:
        raise ValueError("buffer must be contiguous")
    n = mv.nbytes
    if n == 0:
        return 0, 0, mv
    arr = np.frombuffer(mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv, dtype=np.uint8)
    return arr.ctypes.data, n, arr


def crc32c(buf, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of ``buf`` continuing from ``crc``; never copies ``buf``."""
    addr, n, _keep = _addr(buf)
    return native.lib().kvs_crc32c(crc, addr, n)


def copy(dst, src) -> None:
    """Copies all of ``src`` to the start of writable ``dst``; never copies through Python."""
    daddr, dn, _k1 = _addr(dst)
    saddr, sn, _k2 = _addr(src)
    if memoryview(dst).readonly:
        raise ValueError("destination is read-only")
    if sn > dn:
        raise ValueError(f"destination holds {dn} bytes, source has {sn}")
    if sn:
        native.lib().kvs_copy(daddr, saddr, sn, COPY_THREADS)
