"""The value stored under one Redis key: a self-describing header, then the chunk payload.

Layout (little-endian, ``HEADER.size`` = 104 bytes, then ``payload_bytes`` of payload)::

    off  size  field
      0     4  magic  b"KVSR"
      4     1  version (1)
      5     1  level: 0 = stored as given (RAW or a client's bitstream), 1..4 = the
               TierCodec level the uploader encoded with (lossless .. aggressive)
      6     2  flags (0; bit 0 = small companion copy)
      8    64  chunk id (namespace id || key): a value is only served for the id it was
               written for, and lets an admin scan list ids without another index
     72     4  num_tokens
     76     1  encoding (kvstore_wire Encoding)
     77     1  key kind
     78     2  reserved (0)
     80     8  payload_bytes
     88     4  CRC32C of the payload
     92     8  created_s (float64, unix seconds)
    100     4  CRC32C of bytes 0..99

``decode`` verifies all of it and raises DataLoss naming what failed; the tier deletes such
a value and reports a miss.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import kvstore_native as native
from ...config import TierCodec
from ...errors import DataLoss
from ...types import CHUNK_ID_BYTES, ChunkId, ChunkMeta, Encoding, KeyKind

MAGIC = b"KVSR"
VERSION = 1
HEADER = struct.Struct("<4sBBH64sIBBHQIdI")
_BODY = struct.Struct("<4sBBH64sIBBHQId")
assert HEADER.size == 104 and _BODY.size == 100

FLAG_SMALL = 1

#: Level byte <-> TierCodec; 0 means the payload is stored exactly as the caller gave it.
LEVELS = (None, TierCodec.LOSSLESS, TierCodec.NEAR_LOSSLESS, TierCodec.DEFAULT, TierCodec.AGGRESSIVE)


def level_byte(level: TierCodec | None) -> int:
    return 0 if level is None or level == TierCodec.RAW else LEVELS.index(level)


@dataclass(frozen=True, slots=True)
class StoredValue:
    cid: ChunkId
    meta: ChunkMeta
    level: TierCodec | None
    small: bool
    payload: memoryview


def encode(cid: ChunkId, meta: ChunkMeta, payload, level: TierCodec | None = None, small: bool = False) -> bytes:
    """Header + payload as one ``bytes`` (what SET sends)."""
    body = _BODY.pack(MAGIC, VERSION, level_byte(level), FLAG_SMALL if small else 0, bytes(cid),
                      meta.num_tokens, int(meta.encoding), int(meta.key_kind), 0, meta.payload_bytes,
                      meta.crc32c, meta.created_s)
    return b"".join((body, struct.pack("<I", native.crc32c(body)), bytes(payload)))


def decode_header(raw: bytes | memoryview) -> tuple[ChunkId, ChunkMeta, TierCodec | None, bool]:
    """Verifies and parses the header only (scan reads just these bytes)."""
    if len(raw) < HEADER.size:
        raise DataLoss(f"remote value is {len(raw)} bytes, shorter than its {HEADER.size}-byte header")
    (magic, version, level, flags, cid, tokens, enc, kind, _res, size, crc, created,
     hcrc) = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DataLoss("remote value has a bad magic (not written by kvstore, or overwritten)")
    if native.crc32c(memoryview(raw)[: _BODY.size]) != hcrc:
        raise DataLoss("remote value header checksum mismatch")
    if version != VERSION:
        raise DataLoss(f"remote value version {version} is not supported (this build reads {VERSION})")
    if level >= len(LEVELS):
        raise DataLoss(f"remote value has unknown codec level {level}")
    try:
        meta = ChunkMeta(tokens, Encoding(enc), size, crc, KeyKind(kind), created)
    except ValueError as e:
        raise DataLoss(f"remote value header has a bad field ({e})") from None
    return ChunkId(cid), meta, LEVELS[level], bool(flags & FLAG_SMALL)


def decode(raw: bytes, expect: ChunkId) -> StoredValue:
    """Verifies header, id, length and payload CRC32C; raises DataLoss on any mismatch."""
    cid, meta, level, small = decode_header(raw)
    if cid != expect:
        raise DataLoss("remote value belongs to another chunk id")
    payload = memoryview(raw)[HEADER.size:]
    if len(payload) != meta.payload_bytes:
        raise DataLoss(f"remote value payload is {len(payload)} bytes, header says {meta.payload_bytes}")
    if native.crc32c(payload) != meta.crc32c:
        raise DataLoss("remote value payload checksum mismatch")
    return StoredValue(cid, meta, level, small, payload)


assert CHUNK_ID_BYTES == 64
