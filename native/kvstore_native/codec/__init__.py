"""KV-cache codec: a versioned, checksummed, rANS-coded bitstream for KV chunks.

Public API (numpy at the boundary)::

    encode(array, level=CodecLevel.DEFAULT, layout=Layout.KV) -> bytes
    decode(data) -> np.ndarray
    decode_into(data, out) -> np.ndarray
    decode_layers(data, first, count) -> np.ndarray
    info(data) -> Header

Arrays are ``[layers, 2, tokens, kv_heads, head_dim]`` (``Layout.KV``) or
``[layers, tokens, latent]`` (``Layout.MLA``) of float16, bfloat16 (ml_dtypes) or float32.
Every decode validates the whole bitstream and raises :class:`CodecError` (a ValueError) on
malformed input. Native calls release the GIL; ``threads`` spreads layers over threads.
The bitstream is specified byte for byte in docs/bitstream.md.
"""

from __future__ import annotations

import ctypes

import numpy as np

from kvstore_native.codec import native
from kvstore_native.codec.errors import ChecksumError, CodecError
from kvstore_native.codec.format import (LANE_CHOICES, LANES, CodecLevel, DType, Header, Layout, dtype_of,
                                         numpy_dtype)

#: Default cap on the decoded size of one bitstream. A tiny stream may legitimately expand a
#: thousandfold (all-zero KV), so a hostile header could otherwise make a decoder allocate
#: gigabytes; callers decoding bigger chunks pass ``max_decoded_bytes`` explicitly.
DEFAULT_MAX_DECODED_BYTES = 1 << 30

__all__ = ["DEFAULT_MAX_DECODED_BYTES", "CodecError", "ChecksumError", "CodecLevel", "DType", "Layout", "Header",
           "encode", "decode", "decode_into", "decode_layers", "info", "size_breakdown"]


def check_lanes(lanes: int, level: CodecLevel) -> int:
    """The lane count to encode with, or CodecError naming the choices."""
    if isinstance(lanes, bool) or not isinstance(lanes, (int, np.integer)) or int(lanes) not in LANE_CHOICES:
        raise CodecError(f"lanes must be one of {', '.join(map(str, LANE_CHOICES))}, got {lanes!r}")
    if CodecLevel(level) == CodecLevel.LOSSLESS and int(lanes) != LANES:
        raise CodecError(f"the lossless level always uses {LANES} lanes, got lanes={lanes}")
    return int(lanes)


def _shape_args(shape: tuple[int, ...], layout: Layout) -> tuple[int, int, int, int]:
    if layout == Layout.KV:
        if len(shape) != 5 or shape[1] != 2:
            raise CodecError(f"KV layout needs [layers, 2, tokens, heads, head_dim], got {shape}")
        return shape[0], shape[2], shape[3], shape[4]
    if len(shape) != 3:
        raise CodecError(f"MLA layout needs [layers, tokens, latent], got {shape}")
    return shape[0], shape[1], 1, shape[2]


def encode(array: np.ndarray, level: CodecLevel = CodecLevel.DEFAULT,
           layout: Layout = Layout.KV, *, threads: int = 1, bf16: bool = False,
           policy: tuple[int, ...] | None = None, lanes: int = LANES) -> bytes:
    """Encode one chunk. ``bf16=True`` reads a uint16 array as raw bfloat16 bits.

    ``lanes`` (32, 64 or 128; lossless always uses 32): rANS lanes per lossy segment. More
    lanes decode with more parallelism on a GPU (``kvstore_native.codec.gpu``) and cost 8
    bytes per extra lane and segment; every decoder reads every lane count.

    ``policy`` (tuning only) overrides the level's encoder policy: 8 ints, K step offsets
    for shallow/middle/deep layers, V offsets likewise (quarter octaves), K and V channel
    weights (0..4 halves). Decoders do not need it.
    """
    level, layout = CodecLevel(level), Layout(layout)
    lanes = check_lanes(lanes, level)
    a = np.ascontiguousarray(array)
    dt = dtype_of(a.dtype, bf16)
    layers, tokens, heads, head_dim = _shape_args(a.shape, layout)
    so = native.lib()
    cap = so.kvs_codec_encode_bound(dt, layout, layers, tokens, heads, head_dim, level)
    out = ctypes.create_string_buffer(cap)
    size = ctypes.c_uint64(0)
    err = native.err_buf()
    pol = None
    if policy is not None:
        if len(policy) != 8:
            raise CodecError("policy needs 8 integers")
        pol = (ctypes.c_int32 * 8)(*policy)
    code = so.kvs_codec_encode(a.ctypes.data, a.nbytes, dt, layout, layers, tokens, heads, head_dim,
                                level, lanes, pol, threads, out, cap, ctypes.byref(size), err, native.ERR_CAP)
    if code == native.E_BUFFER and size.value > cap:  # bound was too small: retry at the exact size
        cap = size.value
        out = ctypes.create_string_buffer(cap)
        code = so.kvs_codec_encode(a.ctypes.data, a.nbytes, dt, layout, layers, tokens, heads, head_dim,
                                    level, lanes, pol, threads, out, cap, ctypes.byref(size), err, native.ERR_CAP)
    native.check(code, err)
    return out.raw[: size.value]


def _parse(data: bytes) -> native.Info:
    inf = native.Info()
    err = native.err_buf()
    native.check(native.lib().kvs_codec_parse(data, len(data), ctypes.byref(inf), err, native.ERR_CAP), err)
    return inf


def info(data: bytes) -> Header:
    """Header of a bitstream (validates header and index, not the payload)."""
    i = _parse(bytes(data))
    return Header(CodecLevel(i.level), DType(i.dtype), Layout(i.layout), i.layers, i.tokens,
                  i.heads, i.head_dim, i.payload_size, lanes=i.lanes)


def decode_layers(data: bytes, first: int, count: int, out: np.ndarray | None = None, *,
                  threads: int = 1, verify: bool = True,
                  max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> np.ndarray:
    """Decode layers ``[first, first + count)`` (each layer decodes independently)."""
    data = bytes(data)
    h = info(data)
    shape = (count,) + h.shape[1:]
    itemsize = 4 if h.dtype == DType.FLOAT32 else 2
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    if out is None and nbytes > max_decoded_bytes:
        raise CodecError(f"bitstream decodes to {nbytes} bytes, above max_decoded_bytes={max_decoded_bytes}; "
                         "pass a larger max_decoded_bytes (or an `out` array) if this chunk is expected")
    if out is None:
        out = np.empty(shape, dtype=numpy_dtype(h.dtype))
    elif out.shape != shape or not out.flags.c_contiguous or out.itemsize != (4 if h.dtype == DType.FLOAT32 else 2):
        raise CodecError(f"output must be a C-contiguous {shape} array of the chunk dtype {h.dtype.name}")
    err = native.err_buf()
    if first < 0 or count < 0:
        raise CodecError("first and count must be >= 0")
    native.check(native.lib().kvs_codec_decode_layers(data, len(data), first, count, out.ctypes.data, out.nbytes,
                                                threads, int(verify), err, native.ERR_CAP), err)
    return out


def decode(data: bytes, *, threads: int = 1, verify: bool = True,
           max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> np.ndarray:
    """Decode a whole chunk into a new array of the chunk's dtype and shape.

    Raises CodecError when the header announces more than ``max_decoded_bytes``.
    """
    h = info(data)
    return decode_layers(data, 0, h.layers, threads=threads, verify=verify,
                         max_decoded_bytes=max_decoded_bytes)


def decode_into(data: bytes, out: np.ndarray, *, threads: int = 1, verify: bool = True) -> np.ndarray:
    """Decode a whole chunk into ``out`` (C-contiguous, the chunk's shape and dtype size)."""
    h = info(data)
    return decode_layers(data, 0, h.layers, out, threads=threads, verify=verify)


def size_breakdown(data: bytes) -> dict[str, int]:
    """Bytes of the bitstream by role: header+index, channel tables, lane tables, lane data."""
    data = bytes(data)
    h = info(data)
    out = (ctypes.c_uint64 * 3)()
    err = native.err_buf()
    native.check(native.lib().kvs_codec_size_breakdown(data, len(data), out, err, native.ERR_CAP), err)
    return {"container": h.payload_offset, "channel_tables": out[0], "lane_tables": out[1],
            "lane_data": out[2]}
