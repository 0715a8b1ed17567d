"""Engine-memory descriptions for the GPU data path (kvstore_client.gpu): a paged source/destination
(per-chunk ``PlaneSpec``) and the copy-engine rows of a contiguous namespace-layout tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kvstore_native.transfer import PlaneSpec

from .errors import InvalidArgument


@dataclass
class Paged:
    """An engine's paged KV: ``specs[i]`` says where chunk i's tokens live (``PlaneSpec``)."""

    specs: Sequence[PlaneSpec]


def _torch():
    import torch

    return torch


def _tokens_of(t) -> int:
    return int(t.shape[2] if t.dim() == 5 else t.shape[1])


def _whole_chunks(keys: Sequence[bytes], view, chunk_tokens: int) -> int:
    """How many of ``keys``' chunks the engine-side ``view`` (a ``Paged`` or a tensor in the
    namespace layout) has room for: store and retrieve move the same leading run."""
    if isinstance(view, Paged):
        return min(len(keys), len(view.specs))
    return min(len(keys), _tokens_of(view) // chunk_tokens)


def _contiguous_rows(t, ns, n: int):
    """Copy-engine rows for a contiguous namespace-layout CUDA tensor, else None."""
    torch = _torch()
    if not isinstance(t, torch.Tensor) or not t.is_cuda:
        raise InvalidArgument("the GPU data path takes a CUDA tensor or a Paged source")
    if not t.is_contiguous():
        return None
    elt = t.element_size()
    if t.dim() == 5:  # [layers, 2, tokens, heads, dim]
        planes, tokens_total = t.shape[0] * t.shape[1], t.shape[2]
        per_token = t.shape[3] * t.shape[4] * elt
    elif t.dim() == 3:  # MLA [layers, tokens, dim]
        planes, tokens_total, per_token = t.shape[0], t.shape[1], t.shape[2] * elt
    else:
        raise InvalidArgument(f"unexpected KV tensor rank {t.dim()}")
    if planes * ns.chunk_tokens * per_token != ns.chunk_bytes():
        raise InvalidArgument(f"tensor shape {tuple(t.shape)} does not match the namespace's chunk layout")
    pitch = tokens_total * per_token
    row = ns.chunk_tokens * per_token
    base = int(t.data_ptr())
    return [(base + i * row, pitch, row, planes) for i in range(n)]


def _spec_of_tensor(t, ns, i: int) -> PlaneSpec:
    """A strided (non-contiguous) namespace-layout tensor as per-chunk plane specs."""
    elt = t.element_size()
    if t.dim() == 5:
        planes = [t[l, k] for l in range(t.shape[0]) for k in range(t.shape[1])]
    else:
        planes = [t[l].unsqueeze(1) for l in range(t.shape[0])]
    p0 = planes[0]
    start = i * ns.chunk_tokens
    return PlaneSpec([int(p.data_ptr()) for p in planes], list(range(start, start + ns.chunk_tokens)),
                     int(p0.shape[1]), int(p0.shape[2]) * elt, p0.stride(0) * elt, p0.stride(1) * elt)


def decode_map(dst, contiguous, ns, idx: Sequence[int]):
    """Where chunks ``idx`` of a load's destination (a contiguous namespace-layout tensor's
    ``contiguous`` rows, else ``dst``, a :class:`Paged`) receive their decoded elements: a
    ``kvstore_native.codec.gpu.DecodeMap`` for ``load_mapped``, which decodes straight into
    the engine's memory (no staging, no move). A paged destination's chunks share one head size
    and head stride (one engine cache)."""
    import numpy as np

    from kvstore_native.codec.gpu import DecodeMap

    elt, T, channels = ns.dtype.itemsize, ns.chunk_tokens, ns.num_kv_heads * ns.head_dim
    if contiguous is not None:   # (chunk base, plane pitch, chunk row bytes, planes)
        _, pitch, row, planes = contiguous[idx[0]]
        bases = np.array([contiguous[i][0] for i in idx], dtype=np.uint64)
        plane_ptrs = bases[:, None] + np.arange(planes, dtype=np.uint64)[None, :] * np.uint64(pitch)
        toks = np.broadcast_to(np.arange(T, dtype=np.uint64) * np.uint64(row // T), (len(idx), T))
        return DecodeMap(plane_ptrs, toks, channels, 0)
    specs = [dst.specs[i] for i in idx]
    s0 = specs[0]
    for sp in specs:
        if (sp.head_bytes, sp.head_stride, sp.heads) != (s0.head_bytes, s0.head_stride, s0.heads):
            raise InvalidArgument("the paged chunks of one load must share their head size and head stride")
        if len(sp.slots) != T or sp.heads * sp.head_bytes != channels * elt or sp.head_bytes % elt:
            raise InvalidArgument(f"a paged chunk of {len(sp.slots)} tokens x {sp.heads} heads x {sp.head_bytes} "
                                  f"bytes does not hold the namespace's chunk ({T} tokens x {channels * elt} bytes)")
    plane_ptrs = np.array([list(sp.ptrs) for sp in specs], dtype=np.uint64)
    toks = np.array([list(sp.slots) for sp in specs], dtype=np.uint64) * \
        np.array([sp.token_stride for sp in specs], dtype=np.uint64)[:, None]
    return DecodeMap(plane_ptrs, toks, s0.head_bytes // elt, s0.head_stride)
