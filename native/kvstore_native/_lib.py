"""The one ctypes loader of the native libraries (include/kvstore.h is the contract).

- :func:`core` loads ``libkvstore.so`` (``$KVSTORE_NATIVE_LIB`` overrides the path),
  :func:`cuda` loads ``libkvstore_cuda.so`` (``$KVSTORE_CUDA_LIB``); both check
  ``kvs_abi_version() == ABI_VERSION`` and raise :class:`NativeLibraryMissing` (an ImportError)
  when a library is absent, unloadable or of another ABI.
- Every exported function's signature is declared here, once (``_CORE``, ``_CUDA``).
- :func:`check` maps a negative ``KVS_E*`` status to an exception, once: ``KVS_ECHECKSUM`` is
  always :class:`ChecksumError`; every other code raises the caller's domain class
  (:class:`CodecError`, :class:`TransferError`, ...) carrying the code and the C message.

ctypes releases the GIL for the duration of each foreign call.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

from kvstore_native.errors import ChecksumError, NativeError, NativeLibraryMissing

ABI_VERSION = 3  # KVS_ABI_VERSION of include/kvstore.h
CORE_ENV = "KVSTORE_NATIVE_LIB"
CUDA_ENV = "KVSTORE_CUDA_LIB"
LIB_DIR = Path(__file__).resolve().parent / "_lib"

# Status codes (include/kvstore.h, "errors").
OK = 0
EINVAL, ENOSPC, ECORRUPT, ECHECKSUM, EUNSUP, ECUDA, EINTERNAL = -1, -2, -3, -4, -5, -6, -7
CODE_NAMES = {EINVAL: "invalid argument", ENOSPC: "destination too small", ECORRUPT: "corrupt input",
              ECHECKSUM: "checksum mismatch", EUNSUP: "unsupported", ECUDA: "CUDA error",
              EINTERNAL: "internal error"}
#: Capacity of the message buffer passed with every fallible call.
ERR_LEN = 512

# Feature bits of kvs_features().
FEATURE_CRC32C_HW = 1


class CodecInfo(ctypes.Structure):
    """``kvs_codec_info``."""

    _fields_ = [("version", ctypes.c_uint32), ("codec", ctypes.c_uint32), ("level", ctypes.c_uint32),
                ("dtype", ctypes.c_uint32), ("layout", ctypes.c_uint32), ("layers", ctypes.c_uint32),
                ("tokens", ctypes.c_uint32), ("heads", ctypes.c_uint32), ("head_dim", ctypes.c_uint32),
                ("payload_size", ctypes.c_uint64), ("decoded_bytes", ctypes.c_uint64),
                ("payload_offset", ctypes.c_uint64), ("lanes", ctypes.c_uint32)]


_ci, _u32, _u64, _i64, _sz = ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
_vp, _cp, _pu64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint64)
_ERR = [_cp, _sz]  # (err, err_len), last in every fallible call
#: ``kvs_place_fn``: (ctx, count, sizes, dsts) -> 0 or a refusal (kvs_cuda_codec_encode_batch_placed).
PLACE_FN = ctypes.CFUNCTYPE(ctypes.c_int, _vp, _u32, _pu64, _pu64)
_SHAPE = [_ci, _ci, _u32, _u32, _u32, _u32]  # dtype, layout, layers, tokens, heads, head_dim
_PLANES = [_vp, _ci, _vp, _ci, _ci, _i64, _i64, _i64]  # plane_ptrs .. head_stride
_TILES = [_vp, _vp, _vp, _ci, _vp, _vp, _ci, _ci, _ci, _ci, _i64]  # plane_ptrs .. head_stride (kvs_*_tiles)

# name: (restype, argtypes)
_CORE = {
    "kvs_abi_version": (_ci, []),
    "kvs_features": (_ci, []),
    "kvs_crc32c": (_u32, [_u32, _vp, _sz]),
    "kvs_blake2b256": (None, [_vp, _sz, _vp]),
    "kvs_prefix_keys": (_ci, [_cp, _vp, _sz, _u32, _vp] + _ERR),
    "kvs_copy": (None, [_vp, _vp, _sz, _ci]),
    "kvs_zero": (None, [_vp, _sz]),
    "kvs_copy2d": (None, [_vp, _sz, _vp, _sz, _sz, _sz]),
    "kvs_copy2d_crc32c": (_u32, [_vp, _sz, _vp, _sz, _sz, _sz, _u32]),
    "kvs_gather": (_ci, _PLANES + [_vp] + _ERR),
    "kvs_scatter": (_ci, [_vp] + _PLANES + _ERR),
    "kvs_scatter_stream": (_ci, [_vp] + _PLANES + _ERR),
    "kvs_scatter_tiles": (_ci, [_vp] + _TILES + [_ci] + _ERR),
    "kvs_gather_tiles": (_ci, _TILES + [_vp] + _ERR),
    "kvs_codec_encode_bound": (_u64, _SHAPE + [_ci]),
    "kvs_codec_encode": (_ci, [_vp, _u64] + _SHAPE + [_ci, _ci, _vp, _ci, _vp, _u64, _pu64] + _ERR),
    "kvs_codec_parse": (_ci, [_cp, _u64, ctypes.POINTER(CodecInfo)] + _ERR),
    "kvs_codec_decode_layers": (_ci, [_cp, _u64, _u32, _u32, _vp, _u64, _ci, _ci] + _ERR),
    "kvs_codec_size_breakdown": (_ci, [_cp, _u64, _pu64] + _ERR),
    "kvs_codec_debug_convert": (None, [_vp, _vp, _u64, _ci]),
}
_CUDA = {
    "kvs_abi_version": (_ci, []),
    "kvs_cuda_gather": (_ci, _PLANES + [_vp, _vp] + _ERR),
    "kvs_cuda_scatter": (_ci, [_vp] + _PLANES + [_vp] + _ERR),
    "kvs_cuda_scatter_gated": (_ci, [_vp] + _PLANES + [_vp, ctypes.c_int32, _vp] + _ERR),
    "kvs_cuda_codec_encode": (_ci, [_vp] + _SHAPE + [_ci, _vp, _vp, _u64, _pu64] + _ERR),
    "kvs_cuda_codec_decode": (_ci, [_cp, _u64, _vp, _u64, _vp, _u64, _vp, _ci] + _ERR),
    "kvs_cuda_codec_decode_batch": (_ci, [_u32, _vp, _vp, _vp, _vp, _vp, _u64, _vp, _ci] + _ERR),
    "kvs_cuda_codec_load_batch": (_ci, [_u32, _vp, _vp, _vp, _u64, _u32, _vp, _ci] + _ERR),
    "kvs_cuda_codec_load_mapped": (_ci, [_u32, _vp, _vp, _vp] + _SHAPE + [_vp, _vp, _u32, _u64, _u32, _vp, _ci,
                                                                          _vp, _vp] + _ERR),
    "kvs_cuda_codec_encode_batch": (_ci, [_u32, _vp] + _SHAPE + [_ci, _ci, _vp, _vp, _u64, _vp, _vp] + _ERR),
    "kvs_cuda_codec_encode_batch_placed": (_ci, [_u32, _vp] + _SHAPE + [_ci, _ci, _vp, _vp, _vp, _vp, _vp] + _ERR),
    "kvs_cuda_codec_set_decoder": (_ci, [_ci, _ci] + _ERR),
    "kvs_cuda_codec_set_encoder": (_ci, [_ci] + _ERR),
    "kvs_cuda_codec_selftest": (_ci, [_pu64, _pu64] + _ERR),
    "kvs_cuda_crc32c_batch": (_ci, [_u32, _vp, _vp, _vp, _vp] + _ERR),
    "kvs_cuda_crc32c_combine": (_u32, [_u32, _u32, _u64]),
    "kvs_cuda_crc32c_fold": (None, [_vp, _u64, _u64, _u64, _vp]),
    "kvs_cuda_memcpy_batch": (_ci, [_u32, _vp, _vp, _vp, _vp] + _ERR),
    "kvs_cuda_memcpy2d": (_ci, [_u64, _u64, _u64, _u64, _u64, _u64, _vp] + _ERR),
    "kvs_cuda_copy_rows": (_ci, [_u32, _vp, _vp, _u64, _u64, _u64, _u64, _vp] + _ERR),
    "kvs_cuda_copy_rows_gated": (_ci, [_u32, _vp, _vp, _u64, _u64, _u64, _u64, _vp, ctypes.c_int32, _vp] + _ERR),
    "kvs_cuda_prove_prefix": (_ci, [_u32, _vp, _vp, _vp, ctypes.c_int32, _vp] + _ERR),
    "kvs_cuda_stream_sync": (_ci, [_vp] + _ERR),
    "kvs_cuda_device_count": (_ci, [ctypes.POINTER(_ci)] + _ERR),
    "kvs_cuda_set_device": (_ci, [_ci] + _ERR),
    "kvs_cuda_host_register": (_ci, [_u64, _u64] + _ERR),
    "kvs_cuda_host_unregister": (_ci, [_u64] + _ERR),
    "kvs_cuda_malloc": (_ci, [_u64, _pu64] + _ERR),
    "kvs_cuda_free": (_ci, [_u64] + _ERR),
    "kvs_cuda_ipc_get_handle": (_ci, [_u64, _vp] + _ERR),
    "kvs_cuda_ipc_open": (_ci, [_vp, _pu64] + _ERR),
    "kvs_cuda_ipc_close": (_ci, [_u64] + _ERR),
}
#: Bytes of a CUDA IPC memory handle (KVS_CUDA_IPC_HANDLE_BYTES).
IPC_HANDLE_BYTES = 64


def _load(path: Path, signatures: dict, hint: str) -> ctypes.CDLL:
    if not path.is_file():
        raise NativeLibraryMissing(f"{path} is missing: {hint}")
    try:
        so = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeLibraryMissing(f"{path} does not load: {e}") from e
    for name, (restype, argtypes) in signatures.items():
        try:
            fn = getattr(so, name)
        except AttributeError as e:
            raise NativeLibraryMissing(f"{path} lacks {name}: rebuild it ({hint})") from e
        fn.restype, fn.argtypes = restype, argtypes
    abi = so.kvs_abi_version()
    if abi != ABI_VERSION:
        raise NativeLibraryMissing(f"{path} has ABI {abi}, these bindings need {ABI_VERSION}: rebuild it ({hint})")
    return so


@lru_cache(maxsize=None)
def core() -> ctypes.CDLL:
    """``libkvstore.so`` with every signature declared (cached; raises NativeLibraryMissing)."""
    path = Path(os.environ.get(CORE_ENV) or LIB_DIR / "libkvstore.so")
    return _load(path, _CORE, "build it with `pip install ./native` (or `pip install -e native`)")


@lru_cache(maxsize=None)
def cuda() -> ctypes.CDLL:
    """``libkvstore_cuda.so`` (cached; raises NativeLibraryMissing where it was not built)."""
    core()  # its dependency: loaded (and ABI-checked) first
    path = Path(os.environ.get(CUDA_ENV) or LIB_DIR / "libkvstore_cuda.so")
    return _load(path, _CUDA, "the build compiles it only where nvcc is present")


def err_buf() -> ctypes.Array:
    """A message buffer of ``ERR_LEN`` bytes for one call."""
    return ctypes.create_string_buffer(ERR_LEN)


def check(code: int, err: ctypes.Array | None, error: type[NativeError] = NativeError, what: str = "") -> None:
    """Raise the exception of a native status (nothing for ``OK``): ``ChecksumError`` for
    ``ECHECKSUM``, else ``error`` with the C message (or the code's name when it left none)."""
    if code == OK:
        return
    msg = err.value.decode(errors="replace") if err is not None else ""
    msg = msg or CODE_NAMES.get(code, f"native error {code}")
    if what:
        msg = f"{what}: {msg}"
    raise (ChecksumError if code == ECHECKSUM else error)(msg, code)


def call(fn, *args, error: type[NativeError] = NativeError) -> None:
    """``fn(*args, err, ERR_LEN)``, raising through :func:`check` on failure."""
    err = err_buf()
    check(fn(*args, err, ERR_LEN), err, error, fn.__name__)
