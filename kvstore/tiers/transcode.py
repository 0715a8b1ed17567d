"""Converts chunk payloads between RAW tensor bytes and codec bitstreams.

A tier configured with a codec (``dram.codec``, ``disk.codec``) stores RAW chunks encoded;
``tiers.codec.CodecTier`` encodes on the way in (put, write-behind, promotion) and the store converts on
the way out (a Get that asks for another encoding); clients that can decode take chunks as
stored. Decoding needs nothing but the bitstream (it carries its
shape); encoding needs the chunk's shape, which the namespace registry knows.

Called from worker threads and the disk writer thread only (encode and decode run native
code with the GIL released, milliseconds per chunk).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

import kvstore_native as native
from ..config import TierCodec
from ..domain.errors import DataLoss, FailedPrecondition
from ..domain.types import ChunkId, ChunkMeta, DType, Encoding, Layout, split_chunk_id

log = logging.getLogger(__name__)

#: ``namespace_id -> kvstore_wire.keys.Namespace`` (raises NotFound for unknown ids).
NamespaceResolver = Callable[[bytes], object]

_NUMPY = {DType.FLOAT16: np.float16, DType.BFLOAT16: np.uint16, DType.FLOAT32: np.float32}


def _codec():
    try:
        from kvstore_native import codec
    except ImportError as e:  # the native library lacks the codec: a build problem
        raise FailedPrecondition(f"the codec is not available in this build ({e}); rebuild with "
                                 "`pip install -e .`, or set the tier codecs to raw") from None
    return codec


class Transcoder:
    def __init__(self, resolve: NamespaceResolver) -> None:
        self._resolve = resolve
        self._warned: set[bytes] = set()

    def convert(self, cid: ChunkId, meta: ChunkMeta, payload, want: TierCodec) -> tuple[ChunkMeta, object]:
        """``(meta, payload)`` as a tier configured with ``want`` stores it: RAW chunks are
        encoded for a codec tier; bitstreams (a client sent them encoded, or a faster tier
        holds them encoded) stay as they are, since decoding on the way in only to encode or
        serve them again later would be wasted work. Readers decode. A namespace the codec
        cannot handle (fp8) stays RAW."""
        if want == TierCodec.RAW or meta.encoding == Encoding.CODEC:
            return meta, payload
        return self.encode(cid, meta, payload, want)

    def encode(self, cid: ChunkId, meta: ChunkMeta, payload, mode: TierCodec) -> tuple[ChunkMeta, object]:
        codec = _codec()
        ns = self._resolve(split_chunk_id(cid)[0])
        if ns.dtype not in _NUMPY:
            if ns.namespace_id not in self._warned:
                self._warned.add(ns.namespace_id)
                log.warning("namespace %s is %s, which the codec does not support; its chunks stay RAW",
                            ns.namespace_id.hex()[:16], ns.dtype.name)
            return meta, payload
        arr = np.frombuffer(payload, dtype=_NUMPY[ns.dtype]).reshape(ns.chunk_shape(meta.num_tokens))
        layout = codec.Layout.MLA if ns.layout == Layout.MLA_LATENT else codec.Layout.KV
        data = codec.encode(arr, codec.CodecLevel[mode.name], layout, bf16=ns.dtype == DType.BFLOAT16)
        return meta.with_payload(Encoding.CODEC, len(data), native.crc32c(data)), data

    def decode(self, meta: ChunkMeta, payload) -> tuple[ChunkMeta, np.ndarray]:
        codec = _codec()
        try:
            arr = codec.decode(bytes(payload))
        except codec.CodecError as e:
            # The CRC matched, so these are the bytes that were stored: a codec bug or a
            # bitstream from an incompatible build. Never serve it as KV.
            raise DataLoss(f"stored bitstream does not decode ({e})") from None
        raw = arr.view(np.uint8).reshape(-1)
        return meta.with_payload(Encoding.RAW, raw.nbytes, native.crc32c(raw)), raw
