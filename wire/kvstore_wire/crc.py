"""CRC32C (Castagnoli) for payload checksums: always available, never silently off.

Backends, the first that works is used (``BACKEND`` names it):

- ``"native"``: ``kvstore_native`` (the kvstore-native distribution; SSE4.2, GIL released),
- ``"crc32c-wheel"``: the ``crc32c`` PyPI wheel (hardware; the ``fast-crc`` extra of
  kvstore-wire: ``pip install 'kvstore-wire[fast-crc]'``),
- ``"python"``: pure Python + numpy, below. Correct on every host, but slow: measured 55-75 MB/s
  on 1-16 MiB payloads and about 5 MB/s below ``_VECTOR_MIN_BYTES`` (byte loop), on the
  project's 2-core dev VM under load (``python -m kvstore_wire.crc``; there native and the
  wheel did 11-14 GB/s on 16 MiB). The first call over ``SLOW_WARN_BYTES`` logs one WARNING
  saying how to fix it.

``HAVE_FAST_CRC`` is true for the first two. ``BACKENDS`` maps every backend available here to
its function (tests check they agree). ``crc32c(data, crc)`` continues from ``crc``, so
``crc32c(a + b) == crc32c(b, crc32c(a))``.

The pure-Python path cuts a large buffer into ``n`` equal blocks (n a power of two), runs the
table-driven CRC over all blocks at once with numpy (one vector step per 2 bytes of every block,
a 65536-entry table), then merges the block CRCs pairwise with GF(2) multiplication by
``x^(8 * block bytes)`` (the operator that appends that many zero bytes).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_MASK = 0xFFFFFFFF
#: A python-backend call over this many bytes logs the one "slow CRC" warning.
SLOW_WARN_BYTES = 1 << 20
#: Below this, numpy's per-call overhead loses to a plain table loop.
_VECTOR_MIN_BYTES = 1 << 14
#: Bytes per block in the vector path (at least), and the most blocks.
_MIN_BLOCK_BYTES = 64
_MAX_BLOCKS = 1 << 14
#: Vector steps transposed per copy (keeps the transposed piece in cache).
_STEPS_PER_COPY = 64


def _byte_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _byte_table()
_T8 = np.array(_TABLE, dtype=np.uint32)
_lo = np.arange(1 << 16, dtype=np.uint32) & 0xFF
_hi = np.arange(1 << 16, dtype=np.uint32) >> 8
# Two bytes at once: register r, little-endian 16-bit word w -> (r >> 16) ^ _T16[(r ^ w) & 0xFFFF].
_T16 = (_T8[_lo] >> 8) ^ _T8[(_T8[_lo] ^ _hi) & 0xFF]
del _lo, _hi


def _py_bytes(reg: int, data) -> int:
    """Raw register update (no init/xorout) over ``data``, a byte at a time."""
    t = _TABLE
    for b in data:
        reg = t[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


def _gf2_mul(a: int, b: int) -> int:
    """a * b modulo the polynomial, in the reflected domain (0x80000000 is 1)."""
    r = 0
    for _ in range(32):
        if b & 0x80000000:
            r ^= a
        b = (b << 1) & _MASK
        a = (a >> 1) ^ (_POLY if a & 1 else 0)
    return r


def _zeros_op(nbytes: int) -> int:
    """x^(8 * nbytes) mod P: multiplying a register by it appends nbytes zero bytes."""
    result, sq = 0x80000000, 0x00800000  # 1, x^8
    while nbytes:
        if nbytes & 1:
            result = _gf2_mul(result, sq)
        sq = _gf2_mul(sq, sq)
        nbytes >>= 1
    return result


def _gf2_mul_vec(a: np.ndarray, b: int) -> np.ndarray:
    """_gf2_mul of every element of a (uint32) by the constant b."""
    r = np.zeros_like(a)
    poly = np.uint32(_POLY)
    for i in range(32):
        if b & (0x80000000 >> i):
            r ^= a
        a = (a >> np.uint32(1)) ^ ((a & np.uint32(1)) * poly)
    return r


def _py_vector(reg: int, buf: np.ndarray) -> tuple[int, int]:
    """Register after the first ``done`` bytes of ``buf`` (uint8), and ``done``."""
    n = _MAX_BLOCKS
    while n > 1 and buf.size < n * _MIN_BLOCK_BYTES:
        n //= 2
    block = (buf.size // n) & ~1  # even: whole 16-bit words
    done = n * block
    words = buf[:done].reshape(n, block).view("<u2")  # [n, block / 2]: column j is step j
    regs = np.zeros(n, dtype=np.uint32)
    idx = np.empty(n, dtype=np.uint32)
    looked = np.empty(n, dtype=np.uint32)
    for first in range(0, words.shape[1], _STEPS_PER_COPY):
        rows = words[:, first:first + _STEPS_PER_COPY].T.copy()  # contiguous rows, cache-sized
        for row in rows:  # in place: allocation would cost as much as the work
            np.bitwise_xor(regs, row, out=idx)
            np.bitwise_and(idx, 0xFFFF, out=idx)
            np.take(_T16, idx, out=looked)
            np.right_shift(regs, 16, out=regs)
            np.bitwise_xor(regs, looked, out=regs)
    # Merge neighbours: crc(A || B) = crc(A) * x^(8 |B|) ^ crc(B) for registers started at 0.
    span = block
    while regs.size > 1:
        regs = _gf2_mul_vec(regs[0::2], _zeros_op(span)) ^ regs[1::2]
        span *= 2
    return _gf2_mul(reg, _zeros_op(done)) ^ int(regs[0]), done


def _py_crc32c(data, crc: int = 0) -> int:
    mv = memoryview(data)
    if not mv.contiguous:
        raise ValueError("buffer must be contiguous")
    mv = mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv
    reg = (crc ^ _MASK) & _MASK
    done = 0
    if mv.nbytes >= _VECTOR_MIN_BYTES:
        reg, done = _py_vector(reg, np.frombuffer(mv, dtype=np.uint8))
    return _py_bytes(reg, mv[done:]) ^ _MASK


BACKENDS: dict[str, Callable[..., int]] = {"python": _py_crc32c}
native_copy_rows = None
#: ``kvstore_native.copy_rows_crc32c`` (copy + CRC of what was written, one pass), or None.
native_copy_rows_crc32c = None

try:  # the kvstore-native distribution (optional for the client)
    import kvstore_native as _native

    _native.lib()  # built and of the right ABI, else NativeLibraryMissing (an ImportError)
    BACKENDS["native"] = _native.crc32c
    native_copy_rows = _native.copy_rows
    native_copy_rows_crc32c = getattr(_native, "copy_rows_crc32c", None)
except ImportError as _e:
    log.debug("kvstore_native unavailable for CRC32C: %s", _e)

try:  # the fast-crc extra
    import crc32c as _wheel

    def _wheel_crc32c(data, crc: int = 0) -> int:
        return _wheel.crc32c(data, crc)

    BACKENDS["crc32c-wheel"] = _wheel_crc32c
except ImportError:
    pass

BACKEND: str = next(name for name in ("native", "crc32c-wheel", "python") if name in BACKENDS)
HAVE_FAST_CRC: bool = BACKEND != "python"
_impl = BACKENDS[BACKEND]
_warned = False


def crc32c(data, crc: int = 0) -> int:
    """CRC32C of ``data`` (any contiguous buffer), continuing from ``crc`` (0 to start)."""
    global _warned
    if not HAVE_FAST_CRC and not _warned and memoryview(data).nbytes >= SLOW_WARN_BYTES:
        _warned = True
        log.warning("CRC32C runs in pure Python (a few hundred MB/s at best): install kvstore-native or "
                    "the fast-crc extra (pip install 'kvstore-wire[fast-crc]') for hardware CRC32C")
    return _impl(data, crc)


def _measure() -> None:  # python -m kvstore_wire.crc
    import os
    import time

    for size in (4096, 1 << 20, 16 << 20):
        data = os.urandom(size)
        for name, fn in BACKENDS.items():
            dt = float("inf")
            for _ in range(5):  # best of 5: the dev VM is shared
                t = time.perf_counter()
                fn(data)
                dt = min(dt, time.perf_counter() - t)
            print(f"{name:>13} {size:>9} B  {size / dt / 1e6:9.1f} MB/s")


if __name__ == "__main__":
    _measure()
