"""Domain types shared by the tiers, the manager and the server (no grpc, no protobuf)."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field, replace
from typing import NewType

from kvstore_wire.keys import KEY_BYTES
from kvstore_wire.types import DType, Durability, Encoding, KeyKind, Layout, Tier

__all__ = [
    "ChunkId", "chunk_id", "split_chunk_id", "ChunkMeta", "Medium",
    "DType", "Durability", "Encoding", "KeyKind", "Layout", "Tier",
]

#: ``namespace_id (32 bytes) || key (32 bytes)``: the identity a chunk is stored under.
ChunkId = NewType("ChunkId", bytes)
CHUNK_ID_BYTES = 2 * KEY_BYTES

#: A storage medium is a wire ``Tier`` other than ``NONE``.
Medium = Tier


def chunk_id(namespace_id: bytes, key: bytes) -> ChunkId:
    if len(namespace_id) != KEY_BYTES or len(key) != KEY_BYTES:
        raise ValueError(f"namespace_id and key must each be {KEY_BYTES} bytes")
    return ChunkId(bytes(namespace_id) + bytes(key))


def split_chunk_id(cid: bytes) -> tuple[bytes, bytes]:
    return cid[:KEY_BYTES], cid[KEY_BYTES:]


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    """What the daemon knows about one stored chunk besides its bytes.

    ``crc32c`` is the CRC32C (Castagnoli) of the payload as stored; every tier verifies it on
    read. Serialised with a fixed little-endian struct (``to_bytes``) for the disk index.
    """

    num_tokens: int
    encoding: Encoding
    payload_bytes: int
    crc32c: int
    key_kind: KeyKind = KeyKind.PREFIX
    created_s: float = field(default_factory=time.time)

    _STRUCT = struct.Struct("<BIBBQId")  # version, num_tokens, encoding, key_kind, bytes, crc, created
    _VERSION = 1

    def to_bytes(self) -> bytes:
        return self._STRUCT.pack(self._VERSION, self.num_tokens, int(self.encoding), int(self.key_kind),
                                 self.payload_bytes, self.crc32c, self.created_s)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "ChunkMeta":
        if len(raw) < cls._STRUCT.size:
            raise ValueError("truncated chunk metadata")
        v, n, enc, kind, size, crc, created = cls._STRUCT.unpack_from(raw)
        if v != cls._VERSION:
            raise ValueError(f"unsupported chunk metadata version {v}")
        return cls(n, Encoding(enc), size, crc, KeyKind(kind), created)

    def with_payload(self, encoding: Encoding, payload_bytes: int, crc32c: int) -> "ChunkMeta":
        return replace(self, encoding=encoding, payload_bytes=payload_bytes, crc32c=crc32c)
