"""Leased read-only views of stored chunks: read KV straight out of the shared arena.

``retrieve_into`` copies each chunk out of the arena into a caller buffer; an engine that
must copy the KV once more into its own layout (vLLM's paged blocks) would pay two copies.
:func:`lease_views` hands out the leased arena extents themselves instead, so the engine's
own scatter is the only copy:

    with client.leased_views(client.keys(tokens)) as lv:
        for chunk in lv.chunks:           # leading prefix of the keys, in order
            scatter(chunk.data, ...)      # uint8, read-only, one whole chunk, namespace layout
    # the lease is released here: the views must not be read any more

Contract:
- ``chunks`` is the longest stored prefix of ``keys`` (``matched`` of them); each
  ``data`` is the chunk's RAW bytes in the namespace layout ``[layers, 2, num_tokens,
  heads, dim]`` (contiguous, ``chunk_bytes(num_tokens)`` long). Every chunk is full
  (``num_tokens == chunk_tokens``) but, when the caller says so (``last_tokens``), the last
  key's: a trailing partial chunk (``keys(tokens, include_partial=True)``).
- Same host: a RAW chunk's ``data`` is a read-only view of the arena extent, valid while the
  lease lasts (until the context exits, at most ``server.lease_ttl_s``). A codec chunk is
  decoded into memory the views own. Chunks the arena could not lease (another host, the
  arena full of pinned chunks) come over the Get stream into owned memory, verified.
- CRC: as ``fetch`` does: ``verify_crc`` None verifies what crossed a socket, not what the
  arena holds (the daemon checks each extent's CRC before it grants the lease); True
  verifies every chunk here too; a mismatch raises ``DataLoss`` and releases the lease.
- The lease is ended by the front end (``release_later``) on exit, also on errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvstore_wire import crc as _crc
from kvstore_wire._proto.kvstore.v1 import local_pb2
from kvstore_wire.types import Encoding

from . import _common as C
from . import _shm
from ._steps import Call, Work


@dataclass(frozen=True)
class LeasedChunk:
    index: int              #: position in the requested keys
    data: np.ndarray        #: uint8, read-only, the whole RAW chunk in the namespace layout
    leased: bool            #: True: a view of the shared arena (valid only inside the lease)
    num_tokens: int = 0     #: tokens of ``data`` (0: a full chunk; see ``LeasedViews.tokens_of``)
    lossy: bool = False     #: decoded from a lossy bitstream (a lossy tier): not the exact KV


@dataclass
class LeasedViews:
    """What :func:`lease_views` returns; the front end's context manager releases it."""

    chunks: list[LeasedChunk] = field(default_factory=list)
    chunk_tokens: int = 0
    lease_id: int = 0       #: 0: nothing leased (stream path only)

    @property
    def matched(self) -> int:
        """Chunks of the stored prefix (``len(chunks)``)."""
        return len(self.chunks)

    def tokens_of(self, chunk: LeasedChunk) -> int:
        """Tokens ``chunk`` holds (a trailing partial chunk holds fewer than ``chunk_tokens``)."""
        return chunk.num_tokens or self.chunk_tokens

    @property
    def matched_tokens(self) -> int:
        return sum(self.tokens_of(ch) for ch in self.chunks)


def _read_only(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


def _prepare(ns, items: list[tuple], verify: bool, pool, last_tokens: int = 0) -> list[np.ndarray]:
    """Each leased ``(view, num_tokens, encoding, crc)`` as a read-only RAW chunk: checked
    for shape (full chunks, the last one ``last_tokens`` when given: the end of the keys),
    CRC-verified when asked, codec chunks decoded (in parallel on ``pool``)."""

    def one(k: int, item: tuple) -> np.ndarray:
        view, num_tokens, encoding, crc = item
        want = last_tokens if last_tokens and k == len(items) - 1 else ns.chunk_tokens
        size = ns.chunk_bytes(want)
        if num_tokens != want or encoding not in (Encoding.RAW, Encoding.CODEC) or \
                (encoding == Encoding.RAW and view.nbytes != size):
            raise C.DataLoss(f"chunk {k}: the daemon leased {view.nbytes} bytes of {Encoding(encoding).name} with "
                             f"{num_tokens} tokens, expected {want} tokens ({size} bytes RAW)")
        if verify and crc and _crc.crc32c(view) != crc:
            raise C.DataLoss(f"chunk {k}: CRC32C mismatch in the shared arena")
        if encoding == Encoding.RAW:
            return _read_only(view)
        raw = C.decode_chunk(view)
        if raw.nbytes != size:
            raise C.DataLoss(f"chunk {k}: decodes to {raw.nbytes} bytes, expected {size}")
        return _read_only(raw)

    if pool is None or len(items) < 2 or not (verify or any(it[2] != Encoding.RAW for it in items)):
        return [one(k, it) for k, it in enumerate(items)]
    futures = [pool.submit(one, k, it) for k, it in enumerate(items)]
    return [f.result() for f in futures]


def _split(asm: "C.ChunkAssembler", base: int) -> list[LeasedChunk]:
    """The chunks a Get stream assembled (``[rows, columns]``) as contiguous owned chunks."""
    out = []
    for i in range(asm.matched):
        t = asm.tokens_of(i)
        cols = asm.out[:, i * asm.run:i * asm.run + t * asm.token_run]
        out.append(LeasedChunk(base + i, _read_only(np.ascontiguousarray(cols).reshape(-1)), False, t,
                               i in asm.lossy))
    return out


def lease_views(core, keys: list[bytes], verify_crc: bool | None, last_tokens: int = 0):
    """Plan: the longest stored prefix of ``keys`` as :class:`LeasedViews` (see the module
    docstring; ``last_tokens``: the last key is a trailing partial chunk of that many
    tokens). On an error nothing stays leased."""
    ns = core.namespace
    out = LeasedViews(chunk_tokens=ns.chunk_tokens)
    if not keys:
        return out
    if core.arena is not None:
        resp = yield Call("lease_read", local_pb2.LeaseReadRequest(namespace_id=core.namespace_id, keys=keys))
        out.lease_id = resp.lease_id
        try:
            usable = yield from _shm.same_arena(core, resp.arena_nonce)
            arena = core.arena       # one mapping for the whole lease (another thread may re-attach)
            items = []
            for ext in resp.extents if usable and arena is not None else ():
                if not ext.found or ext.index != len(items):
                    break
                items.append((arena.view(ext.offset, ext.length), ext.num_tokens, Encoding(ext.encoding),
                              ext.crc32c))
            last = last_tokens if len(items) == len(keys) else 0
            datas = yield Work(_prepare, (ns, items, bool(verify_crc), core.copy_pool(), last))
            out.chunks = [LeasedChunk(i, d, items[i][2] == Encoding.RAW, items[i][1],
                                      items[i][2] == Encoding.CODEC and C.is_lossy(items[i][0]))
                          for i, d in enumerate(datas)]
        except BaseException:
            core.release_later(out.lease_id)
            raise
    if out.matched < len(keys):
        # Not leasable (absent, another host, the arena full of pinned chunks): the rest of
        # the prefix over the Get stream, verified unless the caller said no.
        base = out.matched
        try:
            asm = C.ChunkAssembler(ns, len(keys) - base, True if verify_crc is None else verify_crc, None,
                                   last_tokens)
            yield from core.stream_get(keys[base:], asm)
        except BaseException:
            core.release_later(out.lease_id)
            raise
        out.chunks.extend(_split(asm, base))
    return out
