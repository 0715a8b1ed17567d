"""``CodecTier``: a wrapper that stores RAW chunks as codec bitstreams (``dram.codec``,
``disk.codec``).

``put`` encodes a RAW chunk before the inner tier copies it; a chunk that is already a
bitstream is stored as it is (decoding only to encode again would be wasted work). ``get``
returns chunks as stored: readers decode (the store, for a client that asks for RAW).
Encoding runs on the calling thread (a worker or the chain's writer thread, never the event
loop): native code with the GIL released, milliseconds per chunk.

When the inner tier is the shared-memory arena, its ``shared_memory()`` face is wrapped too:
a same-host client writes RAW bytes into a reservation, and ``commit`` stores the encoded
copy instead (the reservation is given back), so the tier never holds a RAW chunk.
"""

from __future__ import annotations

from .. import config as cfg
from ..domain.types import ChunkId, ChunkMeta, Encoding
from .base import Tier
from .transcode import Transcoder
from .wrapper import TierWrapper


class CodecTier(TierWrapper):
    def __init__(self, inner: Tier, codec: cfg.TierCodec, transcoder: Transcoder) -> None:
        if codec == cfg.TierCodec.RAW:
            raise ValueError("CodecTier needs a codec other than raw; use the tier itself for raw")
        super().__init__(inner)
        self.codec = codec
        self._transcoder = transcoder

    def encoded(self, cid: ChunkId, meta: ChunkMeta, payload) -> tuple[ChunkMeta, object]:
        """``(meta, payload)`` as this tier stores it."""
        if meta.encoding == Encoding.CODEC:
            return meta, payload
        return self._transcoder.encode(cid, meta, payload, self.codec)

    def put(self, cid: ChunkId, meta: ChunkMeta, payload) -> bool:
        if self.inner.contains(cid):       # immutable: skip the encode of a chunk already stored
            return False
        return self.inner.put(cid, *self.encoded(cid, meta, payload))

    def shared_memory(self):
        shared = self.inner.shared_memory()
        return None if shared is None else _EncodingSharedMemory(shared, self)


class _EncodingSharedMemory:
    """The inner arena's shared-memory face, with ``commit`` storing the encoded chunk."""

    def __init__(self, shared, tier: CodecTier) -> None:
        self._shared = shared
        self._tier = tier

    def __getattr__(self, name: str):     # arena_path, arena_bytes, nonce, lease, offset_of, reserve, abort
        return getattr(self._shared, name)

    def commit(self, res, meta: ChunkMeta) -> None:
        if meta.encoding == Encoding.CODEC:
            self._shared.commit(res, meta)
            return
        try:
            cmeta, cpayload = self._tier.encoded(res.cid, meta, res.view)
        finally:
            self._shared.abort(res)
        self._tier.inner.put(res.cid, cmeta, cpayload)
