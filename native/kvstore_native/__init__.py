"""Bindings of the native core (``libkvstore.so``, loaded by ``kvstore_native._lib``): CRC32C and copies.

ctypes releases the GIL for the duration of each foreign call, so checksums and copies of
large chunks run in parallel with the event loop.
"""

from __future__ import annotations

import ctypes

import numpy as np

from kvstore_native import _lib
from kvstore_native.errors import NativeLibraryMissing

ABI_VERSION = _lib.ABI_VERSION

__all__ = ["ABI_VERSION", "NativeLibraryMissing", "crc32c", "blake2b256", "prefix_keys", "copy_into", "zero", "copy_rows", "copy_rows_crc32c", "lib", "have_hw_crc32c"]


def lib() -> ctypes.CDLL:
    """``libkvstore.so`` with every signature declared (raises :class:`NativeLibraryMissing`)."""
    return _lib.core()


def have_hw_crc32c() -> bool:
    """Whether :func:`crc32c` uses the CPU's CRC32 instruction (else slicing-by-8 tables)."""
    return bool(_lib.core().kvs_features() & _lib.FEATURE_CRC32C_HW)


def _address(buf) -> tuple[int, int, object]:
    """(address, nbytes, keepalive) of any contiguous buffer (bytes, bytearray, memoryview,
    numpy), read-only ones included, without copying it."""
    mv = memoryview(buf)
    if not mv.contiguous:
        raise ValueError("buffer must be contiguous")
    n = mv.nbytes
    if n == 0:
        return 0, 0, mv
    arr = np.frombuffer(mv if mv.ndim == 1 and mv.format == "B" else mv.cast("B"), dtype=np.uint8)
    return arr.ctypes.data, n, arr


def crc32c(data, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of ``data``, continuing from ``crc``."""
    addr, n, _keep = _address(data)
    return lib().kvs_crc32c(crc, addr, n)


def blake2b256(data) -> bytes:
    """BLAKE2b with a 32-byte digest of ``data`` (``hashlib.blake2b(data, digest_size=32)``)."""
    addr, n, _keep = _address(data)
    out = ctypes.create_string_buffer(32)
    lib().kvs_blake2b256(addr, n, out)
    return out.raw


def prefix_keys(previous: bytes, tokens_le, chunk_tokens: int) -> bytes:
    """The chained prefix keys (docs/keys.md) of the packed ``u32le`` token ids ``tokens_le``
    in chunks of ``chunk_tokens`` (the last one the remainder), chained from the 32-byte
    ``previous`` key: ``32 * ceil(tokens / chunk_tokens)`` bytes, key after key."""
    if len(previous) != 32:
        raise ValueError("previous must be a 32-byte key")
    if type(tokens_le) is bytes:   # passed as is (the common case: no buffer export)
        addr, n = tokens_le, len(tokens_le)
    else:
        addr, n, _keep = _address(tokens_le)
    if n % 4:
        raise ValueError("tokens_le must hold whole u32 token ids")
    if not 0 < chunk_tokens <= 0xFFFFFFFF:
        raise ValueError("chunk_tokens must be in 1..2^32-1")
    out = ctypes.create_string_buffer(32 * -(-(n // 4) // chunk_tokens))
    err = _lib.err_buf()
    _lib.check(lib().kvs_prefix_keys(bytes(previous), addr, n // 4, chunk_tokens, out, err, _lib.ERR_LEN), err)
    return out.raw


def copy_into(dst, src, threads: int = 1) -> None:
    """Copy all of ``src`` into the start of writable ``dst`` (GIL released)."""
    if memoryview(dst).readonly:
        raise ValueError("destination is read-only")
    daddr, dn, _k1 = _address(dst)
    saddr, sn, _k2 = _address(src)
    if sn > dn:
        raise ValueError(f"destination holds {dn} bytes, source has {sn}")
    if sn:
        lib().kvs_copy(daddr, saddr, sn, threads)


def zero(dst) -> None:
    """Sets every byte of writable ``dst`` to zero (non-temporal stores for large ranges; GIL
    released)."""
    if memoryview(dst).readonly:
        raise ValueError("destination is read-only")
    addr, n, _k = _address(dst)
    if n:
        lib().kvs_zero(addr, n)


def _check_rows(name: str, dst: np.ndarray, src: np.ndarray) -> None:
    """ValueError unless ``dst`` and ``src`` are 2-D uint8 arrays of one shape with contiguous
    rows and ``dst`` is writable (the row copies' contract)."""
    if dst.shape != src.shape or dst.ndim != 2 or dst.dtype != np.uint8 or src.dtype != np.uint8:
        raise ValueError(f"{name} needs two 2-D uint8 arrays of one shape")
    if dst.strides[1] != 1 or src.strides[1] != 1:
        raise ValueError(f"{name} needs contiguous rows")
    if not dst.flags.writeable:
        raise ValueError("destination is read-only")


def copy_rows(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` for 2-D uint8 arrays of the same shape whose rows are contiguous
    (any row pitch), one native memcpy per row with the GIL released."""
    _check_rows("copy_rows", dst, src)
    lib().kvs_copy2d(dst.ctypes.data, dst.strides[0], src.ctypes.data, src.strides[0], dst.shape[0], dst.shape[1])


def copy_rows_crc32c(dst: np.ndarray, src: np.ndarray, crc: int = 0) -> int:
    """``copy_rows`` that also returns the CRC32C (continuing from ``crc``) of the bytes written
    to ``dst``, rows in order (for a contiguous ``dst``: the CRC of the whole buffer), in the
    same pass over memory (GIL released)."""
    _check_rows("copy_rows_crc32c", dst, src)
    return lib().kvs_copy2d_crc32c(dst.ctypes.data, dst.strides[0], src.ctypes.data, src.strides[0],
                                   dst.shape[0], dst.shape[1], crc)
