"""Paged-KV gather/scatter between an engine's KV memory and the chunk layout.

Wraps ``kvs_gather``/``kvs_scatter`` (native/src/transfer.cpp, CPU) and ``kvs_cuda_gather``/
``kvs_cuda_scatter`` (native/cuda/transfer.cu), loaded by ``kvstore_native._lib``. The engine side is described by
``PlaneSpec`` (one base pointer per plane, strides in bytes, a slot per token), so one
routine serves vLLM's paged blocks, transformers' ``DynamicCache`` and MLA latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kvstore_native import _lib
from kvstore_native.errors import NativeLibraryMissing, TransferError

__all__ = ["PlaneSpec", "TransferError", "cuda_available", "gather", "scatter"]


def cuda_available() -> bool:
    """Whether ``libkvstore_cuda.so`` is built and loads (a CUDA device is not checked)."""
    try:
        _lib.cuda()
        return True
    except NativeLibraryMissing:
        return False


@dataclass(frozen=True)
class PlaneSpec:
    """Where the engine keeps one chunk's KV: element (plane p, token t, head h) starts at
    ``ptrs[p] + slots[t] * token_stride + h * head_stride`` and is ``head_bytes`` long."""

    ptrs: Sequence[int]
    slots: Sequence[int]
    heads: int
    head_bytes: int
    token_stride: int
    head_stride: int

    @property
    def chunk_bytes(self) -> int:
        return len(self.ptrs) * len(self.slots) * self.heads * self.head_bytes

    @classmethod
    def from_layer_tensors(cls, tensors: Sequence[Any], start: int, tokens: int) -> "PlaneSpec":
        """Planes from per-plane tensors shaped ``[1, heads, seq, dim]`` (transformers'
        ``DynamicCache``: K0, V0, K1, V1, ...) for positions ``start .. start+tokens``."""
        t0 = tensors[0]
        _, heads, _, dim = t0.shape
        elt = t0.element_size()
        ptrs = []
        for t in tensors:
            if t.shape[1] != heads or t.shape[3] != dim or t.stride(3) != 1:
                raise TransferError("every plane needs the same [1, heads, seq, dim] shape with a contiguous last dim")
            if t.stride() != t0.stride():
                raise TransferError("every plane needs the same strides")
            ptrs.append(t.data_ptr())
        return cls(ptrs, list(range(start, start + tokens)), heads, dim * elt, t0.stride(2) * elt, t0.stride(1) * elt)


def _call(name: str, *args) -> None:
    if name.startswith("kvs_cuda_"):
        try:
            so = _lib.cuda()
        except NativeLibraryMissing as e:
            raise TransferError(str(e)) from e
    else:
        so = _lib.core()
    _lib.call(getattr(so, name), *args, error=TransferError)


def _arrays(spec: PlaneSpec) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(spec.ptrs, dtype=np.uint64), np.asarray(spec.slots, dtype=np.int64)


def gather(spec: PlaneSpec, chunk_ptr: int, *, device: bool, stream: int = 0) -> None:
    """Copies the engine's KV described by ``spec`` into the contiguous chunk at ``chunk_ptr``.

    ``device=True``: engine memory is CUDA memory and ``chunk_ptr`` is device memory or
    pinned/registered host memory (asynchronous on ``stream``)."""
    ptrs, slots = _arrays(spec)
    args = (ptrs.ctypes.data, len(ptrs), slots.ctypes.data, len(slots), spec.heads, spec.head_bytes,
            spec.token_stride, spec.head_stride, chunk_ptr)
    if device:
        _call("kvs_cuda_gather", *args, stream)
    else:
        _call("kvs_gather", *args)


def scatter(chunk_ptr: int, spec: PlaneSpec, *, device: bool, stream: int = 0) -> None:
    """The inverse of ``gather``: writes the contiguous chunk into the engine's KV memory."""
    ptrs, slots = _arrays(spec)
    args = (chunk_ptr, ptrs.ctypes.data, len(ptrs), slots.ctypes.data, len(slots), spec.heads,
            spec.head_bytes, spec.token_stride, spec.head_stride)
    if device:
        _call("kvs_cuda_scatter", *args, stream)
    else:
        _call("kvs_scatter", *args)
