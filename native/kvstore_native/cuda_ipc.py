"""CUDA runtime helpers of ``libkvstore_cuda.so`` (include/kvstore.h, "CUDA batch copies,
checksums, pools, IPC"): batched CRC32C on the GPU, copy-engine copies, device allocations and
their CUDA IPC export/mapping. No torch dependency: pointers are ints, streams are
``cudaStream_t`` values (0 = the legacy default stream).

Every failure raises :class:`CudaError` (a ``TransferError``) with the CUDA message;
:func:`available` says whether the library loads and a device exists.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import numpy as np

from kvstore_native import _lib
from kvstore_native.errors import NativeLibraryMissing, TransferError

IPC_HANDLE_BYTES = _lib.IPC_HANDLE_BYTES


class CudaError(TransferError):
    """A CUDA runtime call failed (or the CUDA library is absent)."""


def _so():
    try:
        return _lib.cuda()
    except NativeLibraryMissing as e:
        raise CudaError(str(e)) from e


def _call(name: str, *args) -> None:
    so = _so()
    _lib.call(getattr(so, name), *args, error=CudaError)


def available() -> bool:
    """The CUDA library loads and at least one CUDA device is visible."""
    try:
        so = _lib.cuda()
    except NativeLibraryMissing:
        return False
    n = ctypes.c_int(0)
    err = _lib.err_buf()
    return so.kvs_cuda_device_count(ctypes.byref(n), err, _lib.ERR_LEN) == 0 and n.value > 0


def _u64(values: Sequence[int]) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=np.uint64))


def crc32c_batch(ptrs: Sequence[int], lens: Sequence[int], out_ptr: int, stream: int = 0) -> None:
    """Launches the GPU CRC32C of each ``(ptrs[i], lens[i])`` buffer (device-addressable) into
    ``out_ptr`` (uint32[count], device or pinned host memory); asynchronous on ``stream``."""
    if len(ptrs) != len(lens):
        raise CudaError("ptrs and lens differ in length")
    p, n = _u64(ptrs), _u64(lens)
    _call("kvs_cuda_crc32c_batch", len(p), p.ctypes.data, n.ctypes.data, out_ptr, stream)


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32c(A||B) from crc32c(A), crc32c(B) and len(B)."""
    return int(_so().kvs_cuda_crc32c_combine(crc1, crc2, len2))


def crc32c_fold(crcs: np.ndarray, per_group: int, len_each: int) -> np.ndarray:
    """CRC32C of each run of ``per_group`` consecutive buffers of ``len_each`` bytes, from their CRCs."""
    c = np.ascontiguousarray(crcs, dtype=np.uint32)
    groups = c.size // per_group if per_group else 0
    out = np.empty(groups, np.uint32)
    _so().kvs_cuda_crc32c_fold(c.ctypes.data, per_group, len_each, groups, out.ctypes.data)
    return out


def memcpy_batch(dsts: Sequence[int], srcs: Sequence[int], sizes: Sequence[int], stream: int = 0) -> None:
    """Copy-engine copies ``srcs[i] -> dsts[i]`` of ``sizes[i]`` bytes, asynchronous on ``stream``."""
    if not (len(dsts) == len(srcs) == len(sizes)):
        raise CudaError("dsts, srcs and sizes differ in length")
    d, s, n = _u64(dsts), _u64(srcs), _u64(sizes)
    _call("kvs_cuda_memcpy_batch", len(d), d.ctypes.data, s.ctypes.data, n.ctypes.data, stream)


def memcpy2d(dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int, stream: int = 0) -> None:
    """``height`` rows of ``width`` bytes by the copy engine (cudaMemcpy2DAsync)."""
    _call("kvs_cuda_memcpy2d", dst, dst_pitch, src, src_pitch, width, height, stream)


def copy_rows(dsts: Sequence[int], srcs: Sequence[int], dst_pitch: int, src_pitch: int, width: int, height: int,
              stream: int = 0) -> None:
    """SM-kernel batch of 2D copies of one shape (device-to-device; one launch for all jobs)."""
    if len(dsts) != len(srcs):
        raise CudaError("dsts and srcs differ in length")
    d, s = _u64(dsts), _u64(srcs)
    _call("kvs_cuda_copy_rows", len(d), d.ctypes.data, s.ctypes.data, dst_pitch, src_pitch, width, height, stream)


def copy_rows_gated(dsts: Sequence[int], srcs: Sequence[int], dst_pitch: int, src_pitch: int, width: int,
                    height: int, gate_ptr: int, first: int, stream: int = 0) -> None:
    """``copy_rows`` that skips job i unless ``first + i < *gate`` (``gate_ptr``: an int32 in
    device memory, read when the kernel runs; e.g. a prefix ``prove_prefix`` extends). Needs
    16-byte aligned addresses, pitches and width."""
    if len(dsts) != len(srcs):
        raise CudaError("dsts and srcs differ in length")
    d, s = _u64(dsts), _u64(srcs)
    _call("kvs_cuda_copy_rows_gated", len(d), d.ctypes.data, s.ctypes.data, dst_pitch, src_pitch, width, height,
          gate_ptr, first, stream)


def prove_prefix(got_ptr: int, want: Sequence[int], gate_ptr: int, first: int, stream: int = 0) -> None:
    """Extends the proven prefix ``*gate`` (int32, device memory) on ``stream``: when it equals
    ``first``, it becomes ``first`` + the number of leading ``i`` with ``got[i] == want[i]``
    (``got_ptr``: uint32[len(want)], device or pinned, e.g. ``crc32c_batch``'s output); else it
    stays (an earlier mismatch ended the prefix)."""
    w = np.ascontiguousarray(np.asarray(want, dtype=np.uint32))
    _call("kvs_cuda_prove_prefix", len(w), got_ptr, w.ctypes.data, gate_ptr, first, stream)


def stream_sync(stream: int = 0) -> None:
    _call("kvs_cuda_stream_sync", stream)


def set_device(device: int) -> None:
    _call("kvs_cuda_set_device", device)


def host_register(ptr: int, nbytes: int) -> None:
    """Page-locks ``[ptr, ptr+nbytes)`` for the device (idempotent)."""
    _call("kvs_cuda_host_register", ptr, nbytes)


def host_unregister(ptr: int) -> None:
    _call("kvs_cuda_host_unregister", ptr)


def malloc(nbytes: int) -> int:
    """A plain ``cudaMalloc`` allocation (exportable by :func:`ipc_handle`)."""
    out = ctypes.c_uint64(0)
    _call("kvs_cuda_malloc", nbytes, ctypes.byref(out))
    return int(out.value)


def free(ptr: int) -> None:
    _call("kvs_cuda_free", ptr)


def ipc_handle(ptr: int) -> bytes:
    """The CUDA IPC handle (64 bytes) of the allocation whose base is ``ptr``."""
    buf = ctypes.create_string_buffer(IPC_HANDLE_BYTES)
    _call("kvs_cuda_ipc_get_handle", ptr, buf)
    return buf.raw


def ipc_open(handle: bytes) -> int:
    """Maps another process's allocation into this one; returns its base pointer here."""
    if len(handle) != IPC_HANDLE_BYTES:
        raise CudaError(f"a CUDA IPC handle is {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
    out = ctypes.c_uint64(0)
    _call("kvs_cuda_ipc_open", ctypes.create_string_buffer(bytes(handle), IPC_HANDLE_BYTES), ctypes.byref(out))
    return int(out.value)


def ipc_close(ptr: int) -> None:
    _call("kvs_cuda_ipc_close", ptr)
