"""Pure-Python view of the container header and layer index (docs/bitstream.md).

The native library is the reference parser; this module mirrors it for tooling, for tests
that craft hostile headers, and for callers that only need the shape of a bitstream.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"KVCZ"
VERSION = 1
HEADER_SIZE = 64
INDEX_ENTRY_SIZE = 16
CODEC_RANS_V1 = 1
PROB_BITS = 12
LANES = 32  # the default lane count of a lossy segment (and the only one of lossless)
#: Lane counts a lossy segment may use (the header's ``lanes`` byte): more lanes decode with
#: more parallelism on a GPU for 8 more bytes per lane per segment.
LANE_CHOICES = (32, 64, 128)
_HEADER = struct.Struct("<4sHHBBBBIIIIIBBHQI12sI")
assert _HEADER.size == HEADER_SIZE


class CodecLevel(enum.IntEnum):
    """Quality level; LOSSLESS keeps the exact bytes, the others are lossy."""

    LOSSLESS = 0
    NEAR_LOSSLESS = 1
    DEFAULT = 2
    AGGRESSIVE = 3


class DType(enum.IntEnum):
    FLOAT16 = 1
    BFLOAT16 = 2
    FLOAT32 = 3


class Layout(enum.IntEnum):
    """KV: ``[layers, 2, tokens, heads, head_dim]``; MLA: ``[layers, tokens, latent]``."""

    KV = 1
    MLA = 2


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C in pure Python (slow; for tests and tooling)."""
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@dataclass(frozen=True)
class Header:
    level: CodecLevel
    dtype: DType
    layout: Layout
    layers: int
    tokens: int
    heads: int
    head_dim: int
    payload_size: int
    index_crc: int = 0
    codec: int = CODEC_RANS_V1
    lanes: int = LANES

    @property
    def shape(self) -> tuple[int, ...]:
        if self.layout == Layout.KV:
            return (self.layers, 2, self.tokens, self.heads, self.head_dim)
        return (self.layers, self.tokens, self.head_dim)

    @property
    def payload_offset(self) -> int:
        return HEADER_SIZE + INDEX_ENTRY_SIZE * self.layers

    def pack(self) -> bytes:
        """The 64 header bytes, CRC included."""
        body = _HEADER.pack(MAGIC, VERSION, HEADER_SIZE, self.codec, self.level, self.dtype,
                            self.layout, self.layers, self.tokens, self.heads, self.head_dim, 0,
                            PROB_BITS, self.lanes, 0, self.payload_size, self.index_crc,
                            b"\0" * 12, 0)
        return body[:60] + struct.pack("<I", crc32c(body[:60]))


def parse_header(buf: bytes) -> Header:
    """Parse the 64-byte header (checks magic, version and header CRC only)."""
    if len(buf) < HEADER_SIZE:
        raise ValueError(f"bitstream too short: {len(buf)} bytes")
    (magic, version, hsize, codec, level, dtype, layout, layers, tokens, heads, head_dim, flags,
     _pb, lanes, _r, payload, index_crc, _res, crc) = _HEADER.unpack_from(buf)
    if magic != MAGIC or version != VERSION or hsize != HEADER_SIZE:
        raise ValueError("not a kvstore codec v1 bitstream")
    if crc32c(bytes(buf[:60])) != crc:
        raise ValueError("header checksum mismatch")
    return Header(CodecLevel(level), DType(dtype), Layout(layout), layers, tokens, heads,
                  head_dim, payload, index_crc, codec, lanes)


def parse_index(buf: bytes, header: Header) -> list[tuple[int, int, int]]:
    """(offset, size, crc32c) of every layer, offsets relative to the payload start."""
    return [struct.unpack_from("<QII", buf, HEADER_SIZE + INDEX_ENTRY_SIZE * i)
            for i in range(header.layers)]


_NP_DTYPES = {DType.FLOAT16: np.dtype(np.float16), DType.FLOAT32: np.dtype(np.float32)}


def numpy_dtype(dtype: DType) -> np.dtype:
    """numpy dtype of a codec dtype; bf16 maps to uint16 (its raw bits) when ml_dtypes is absent."""
    if dtype == DType.BFLOAT16:
        try:
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        except ImportError:
            return np.dtype(np.uint16)
    return _NP_DTYPES[dtype]


def dtype_of(array_dtype: np.dtype, bf16: bool = False) -> DType:
    """Codec dtype of a numpy dtype (uint16 only with ``bf16=True``)."""
    if array_dtype == np.float16:
        return DType.FLOAT16
    if array_dtype == np.float32:
        return DType.FLOAT32
    if array_dtype.name == "bfloat16" or (bf16 and array_dtype == np.uint16):
        return DType.BFLOAT16
    raise TypeError(f"unsupported dtype {array_dtype}; use float16, bfloat16 or float32")
