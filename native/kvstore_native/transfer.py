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

__all__ = ["PlaneSpec", "TileSpec", "TransferError", "cuda_available", "gather", "scatter", "gather_tiles",
           "scatter_tiles", "paged_views", "paged_spec"]


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


#: vLLM GPU KV-cache layouts of one layer's tensor (``paged_views`` turns each into per-plane views
#: shaped ``[num_blocks, block_size, heads, dim]``, strides as they are):
#: FlashAttention ``[2, blocks, block_size, heads, dim]`` (NHD) / ``[2, blocks, heads, block_size, dim]`` (HND);
#: FlashInfer ``[blocks, 2, block_size, heads, dim]`` / ``[blocks, 2, heads, block_size, dim]``;
#: K/V separate: a (K, V) pair of ``[blocks, block_size, heads, dim]`` (``separate_nhd``) or
#: ``[blocks, heads, block_size, dim]`` (``separate_hnd``); MLA latent ``[blocks, block_size, dim]``.
PAGED_LAYOUTS = ("fa_nhd", "fa_hnd", "fi_nhd", "fi_hnd", "separate_nhd", "separate_hnd", "mla")


def paged_views(layer: Any, layout: str) -> list[Any]:
    """Per-plane views ``[blocks, block_size, heads, dim]`` (K then V; one plane for MLA) of one
    layer's cache in a vLLM layout (``PAGED_LAYOUTS``); no copy, strides read as they are, so
    per-layer strided views into one big buffer work too."""
    if layout == "fa_nhd":
        return [layer[0], layer[1]]
    if layout == "fa_hnd":
        return [layer[0].transpose(1, 2), layer[1].transpose(1, 2)]
    if layout == "fi_nhd":
        return [layer[:, 0], layer[:, 1]]
    if layout == "fi_hnd":
        return [layer[:, 0].transpose(1, 2), layer[:, 1].transpose(1, 2)]
    if layout == "separate_nhd":
        return [layer[0], layer[1]]
    if layout == "separate_hnd":
        return [layer[0].transpose(1, 2), layer[1].transpose(1, 2)]
    if layout == "mla":
        return [layer.unsqueeze(2)]
    raise TransferError(f"unknown paged layout {layout!r}; known: {', '.join(PAGED_LAYOUTS)}")


def paged_spec(layers: Sequence[Any], layout: str, block_ids: Sequence[int], tokens: int,
               first_token: int = 0) -> PlaneSpec:
    """The ``PlaneSpec`` of ``tokens`` tokens starting at position ``first_token`` of a sequence
    whose KV lives in the paged blocks ``block_ids`` of per-layer caches ``layers`` (torch tensors
    in ``layout``). Planes are (layer 0 K, layer 0 V, layer 1 K, ...), or one per layer for MLA."""
    views = [v for layer in layers for v in paged_views(layer, layout)]
    v0 = views[0]
    if v0.dim() != 4:
        raise TransferError(f"{layout}: each plane view must be [blocks, block_size, heads, dim], got {tuple(v0.shape)}")
    _, bs, heads, dim = v0.shape
    elt = v0.element_size()
    for v in views:
        if tuple(v.shape) != tuple(v0.shape) or v.stride() != v0.stride():
            raise TransferError(f"{layout}: every plane needs one shape and one stride set")
        if v.stride(3) != 1:
            raise TransferError(f"{layout}: the head dimension must be contiguous")
    bstride, tstride, hstride = v0.stride(0) * elt, v0.stride(1) * elt, v0.stride(2) * elt
    if bstride % tstride:
        raise TransferError(f"{layout}: block stride {bstride} is not a multiple of the token stride {tstride}")
    per_block = bstride // tstride
    need = (first_token + tokens + bs - 1) // bs
    if len(block_ids) < need:
        raise TransferError(f"{tokens} tokens from position {first_token} need {need} blocks, got {len(block_ids)}")
    slots = [int(block_ids[(first_token + i) // bs]) * per_block + (first_token + i) % bs for i in range(tokens)]
    return PlaneSpec([int(v.data_ptr()) for v in views], slots, int(heads), int(dim) * elt, tstride, hstride)


@dataclass(frozen=True)
class TileSpec:
    """Host KV whose planes each have their own row and element strides (vLLM-CPU's
    ``CPU_ATTN`` tiles: K dim-major, V token-major). Element (plane p, token t, head h,
    element e) is at ``ptrs[p] + block_offs[t] + rows[t] * row_strides[p] + h * head_stride +
    e * elem_strides[p]`` (bytes), ``elem_bytes`` long; the chunk side is contiguous
    ``[planes, tokens, heads, head_elems]``."""

    ptrs: Sequence[int]
    row_strides: Sequence[int]
    elem_strides: Sequence[int]
    block_offs: Sequence[int]
    rows: Sequence[int]
    heads: int
    head_elems: int
    elem_bytes: int
    head_stride: int

    @property
    def chunk_bytes(self) -> int:
        return len(self.ptrs) * len(self.rows) * self.heads * self.head_elems * self.elem_bytes

    def plane(self, p: int) -> "TileSpec":
        """The same spec for plane ``p`` alone."""
        from dataclasses import replace

        return replace(self, ptrs=[self.ptrs[p]], row_strides=[self.row_strides[p]],
                       elem_strides=[self.elem_strides[p]])

    def _args(self) -> tuple:
        arrays = (np.asarray(self.ptrs, dtype=np.uint64), np.asarray(self.row_strides, dtype=np.int64),
                  np.asarray(self.elem_strides, dtype=np.int64), np.asarray(self.block_offs, dtype=np.int64),
                  np.asarray(self.rows, dtype=np.int64))
        n = len(arrays[0])
        if not (len(arrays[1]) == len(arrays[2]) == n) or len(arrays[3]) != len(arrays[4]):
            raise TransferError("TileSpec: one row and element stride per plane, one block offset per row")
        a = [np.ascontiguousarray(x) for x in arrays]
        return a, (a[0].ctypes.data, a[1].ctypes.data, a[2].ctypes.data, n, a[3].ctypes.data, a[4].ctypes.data,
                   len(a[4]), self.heads, self.head_elems, self.elem_bytes, self.head_stride)


def scatter_tiles(chunk_ptr: int, spec: TileSpec, *, streaming: bool = False) -> None:
    """Writes the contiguous chunk at ``chunk_ptr`` into the host KV ``spec`` describes.
    ``streaming``: non-temporal stores (loads much larger than the caches); same bytes."""
    keep, args = spec._args()
    _call("kvs_scatter_tiles", chunk_ptr, *args, int(streaming))
    del keep


def gather_tiles(spec: TileSpec, chunk_ptr: int) -> None:
    """The inverse of ``scatter_tiles``: copies the host KV into the contiguous chunk."""
    keep, args = spec._args()
    _call("kvs_gather_tiles", *args, chunk_ptr)
    del keep


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


def scatter(chunk_ptr: int, spec: PlaneSpec, *, device: bool, stream: int = 0, streaming: bool = False,
            gate: tuple[int, int] | None = None) -> None:
    """The inverse of ``gather``: writes the contiguous chunk into the engine's KV memory.
    ``streaming`` (host only): non-temporal stores (``kvs_scatter_stream``), for loads much
    larger than the caches; the bytes written are the same. ``gate`` (device only): ``(int32
    device pointer, index)``: the kernel writes nothing unless ``index < *gate`` when it runs."""
    ptrs, slots = _arrays(spec)
    args = (chunk_ptr, ptrs.ctypes.data, len(ptrs), slots.ctypes.data, len(slots), spec.heads,
            spec.head_bytes, spec.token_stride, spec.head_stride)
    if gate is not None:
        if not device:
            raise TransferError("a gated scatter is a device scatter (device=True)")
        _call("kvs_cuda_scatter_gated", *args, gate[0], gate[1], stream)
    elif device:
        _call("kvs_cuda_scatter", *args, stream)
    else:
        _call("kvs_scatter_stream" if streaming else "kvs_scatter", *args)
