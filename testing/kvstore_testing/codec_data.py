"""Synthetic KV chunks and bitstream surgery for codec tests, fuzzing and benchmarks."""

from __future__ import annotations

import struct

import numpy as np

from kvstore_native import crc32c


def synthetic_kv(layers=4, tokens=64, heads=3, head_dim=64, seed=0, dtype=np.float16):
    """KV-like data: smooth along tokens, per-channel offsets and a few outlier channels in K."""
    rng = np.random.default_rng(seed)
    c = heads * head_dim
    base = rng.normal(0, 1, (layers, 2, 1, c)) * np.array([3.0, 0.3])[None, :, None, None]
    walk = np.cumsum(rng.normal(0, 0.3, (layers, 2, tokens, c)), axis=2)
    noise = rng.laplace(0, 0.5, (layers, 2, tokens, c))
    x = base + 0.3 * walk + noise
    x[:, 0, :, :: max(1, c // 8)] *= 8.0  # outlier key channels
    return x.reshape(layers, 2, tokens, heads, head_dim).astype(dtype)


def fix_checksums(buf: bytes) -> bytes:
    """Recompute every CRC of a (possibly mutated) bitstream so mutations reach the decoder."""
    b = bytearray(buf)
    if len(b) < 64:
        return bytes(b)
    layers = struct.unpack_from("<I", b, 12)[0]
    po = 64 + 16 * layers
    if layers <= 4096 and po <= len(b):
        for i in range(layers):
            off, size, _ = struct.unpack_from("<QII", b, 64 + 16 * i)
            if po + off + size <= len(b):
                seg = bytes(b[po + off: po + off + size])
                struct.pack_into("<I", b, 64 + 16 * i + 12, crc32c(seg))
        idx = bytes(b[64:po])
        struct.pack_into("<I", b, 44, crc32c(idx))
    struct.pack_into("<I", b, 60, crc32c(bytes(b[:60])))
    return bytes(b)
