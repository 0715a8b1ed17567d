"""ctypes bindings of ``libkvstore.so`` (the C ABI of native/codec/kvc_capi.h).

ctypes releases the GIL for the duration of every call.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from kvstore_native.codec.errors import ChecksumError, CodecError

OK, E_INVALID, E_ARGUMENT, E_BUFFER, E_CHECKSUM = 0, 1, 2, 3, 4
ERR_CAP = 512
LIB_ENV = "KVSTORE_NATIVE_LIB"
_NATIVE_DIR = Path(__file__).resolve().parent.parent / "_lib"


class Info(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("codec", ctypes.c_uint32), ("level", ctypes.c_uint32),
                ("dtype", ctypes.c_uint32), ("layout", ctypes.c_uint32), ("layers", ctypes.c_uint32),
                ("tokens", ctypes.c_uint32), ("heads", ctypes.c_uint32), ("head_dim", ctypes.c_uint32),
                ("payload_size", ctypes.c_uint64), ("decoded_bytes", ctypes.c_uint64),
                ("payload_offset", ctypes.c_uint64)]


@functools.lru_cache(maxsize=None)
def lib(path: str | None = None) -> ctypes.CDLL:
    """Load the native library (``$KVSTORE_NATIVE_LIB`` or kvstore_native/_lib/libkvstore.so)."""
    path = path or os.environ.get(LIB_ENV) or str(_NATIVE_DIR / "libkvstore.so")
    if not Path(path).is_file():
        raise ImportError(f"{path} not found: build it with `bash native/codec/build_dev.sh` "
                          "or `pip install -e .`")
    so = ctypes.CDLL(path)
    u8p, vp, u32, u64, ci = ctypes.c_char_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int
    so.kvc_abi_version.restype = ci
    so.kvc_crc32c.argtypes = [vp, u64, u32]
    so.kvc_crc32c.restype = u32
    so.kvc_encode_bound.argtypes = [ci, ci, u32, u32, u32, u32, ci]
    so.kvc_encode_bound.restype = u64
    so.kvc_encode.argtypes = [vp, u64, ci, ci, u32, u32, u32, u32, ci, ci, vp, u64,
                              ctypes.POINTER(u64), vp, u64]
    so.kvc_encode_policy.argtypes = [vp, u64, ci, ci, u32, u32, u32, u32, ci, vp, ci, vp, u64,
                                     ctypes.POINTER(u64), vp, u64]
    so.kvc_parse.argtypes = [u8p, u64, ctypes.POINTER(Info), vp, u64]
    so.kvc_decode_layers.argtypes = [u8p, u64, u32, u32, vp, u64, ci, ci, vp, u64]
    so.kvc_size_breakdown.argtypes = [u8p, u64, ctypes.POINTER(u64), vp, u64]
    for f in (so.kvc_encode, so.kvc_encode_policy, so.kvc_parse, so.kvc_decode_layers, so.kvc_size_breakdown):
        f.restype = ci
    if so.kvc_abi_version() != 1:
        raise ImportError(f"{path}: unexpected ABI version {so.kvc_abi_version()}")
    return so


def check(code: int, err: ctypes.Array) -> None:
    """Raise the exception of a native status code."""
    if code == OK:
        return
    msg = err.value.decode(errors="replace") or f"native codec error {code}"
    if code == E_CHECKSUM:
        raise ChecksumError(msg)
    raise CodecError(msg)


def err_buf() -> ctypes.Array:
    return ctypes.create_string_buffer(ERR_CAP)
