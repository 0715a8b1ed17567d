"""The codec's view of ``libkvstore.so`` (the ``kvs_codec_*`` functions of include/kvstore.h).

Loading, signatures and the status -> exception mapping live in ``kvstore_native._lib``; this
module only names what the codec uses. ctypes releases the GIL for the duration of every call.
"""

from __future__ import annotations

import ctypes

from kvstore_native import _lib
from kvstore_native.codec.errors import CodecError

OK, E_BUFFER = _lib.OK, _lib.ENOSPC
ERR_CAP = _lib.ERR_LEN
Info = _lib.CodecInfo


def lib() -> ctypes.CDLL:
    """``libkvstore.so`` (raises ``NativeLibraryMissing``, an ImportError, when it is not built)."""
    return _lib.core()


def check(code: int, err: ctypes.Array) -> None:
    """Raise the codec exception of a native status (ChecksumError for a CRC mismatch)."""
    _lib.check(code, err, CodecError)


def err_buf() -> ctypes.Array:
    return _lib.err_buf()
