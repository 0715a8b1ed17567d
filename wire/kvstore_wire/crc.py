"""CRC32C (Castagnoli) for payload checksums, and the native row copy when available.

Uses the daemon package's native implementation (hardware CRC, GIL released) when it is
importable; otherwise a table-driven pure-Python fallback that is correct but slow
(~10 MB/s), so ``HAVE_FAST_CRC`` tells callers whether verifying large payloads is cheap.
"""

from __future__ import annotations

try:  # optional: the daemon package ships the native library
    from kvstore_native import copy_rows as native_copy_rows, crc32c as _native_crc32c, lib as _lib

    _lib()
    HAVE_FAST_CRC = True
except Exception:  # noqa: BLE001 - not installed or not built: fall back
    _native_crc32c = None
    native_copy_rows = None
    HAVE_FAST_CRC = False

_POLY = 0x82F63B78
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def _py_crc32c(data, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    t = _TABLE
    for b in memoryview(data).cast("B"):
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c(data, crc: int = 0) -> int:
    if _native_crc32c is not None:
        return _native_crc32c(data, crc)
    return _py_crc32c(data, crc)
