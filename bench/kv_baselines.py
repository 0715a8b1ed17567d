"""Baseline KV compressors for the quality and speed benchmarks (numpy, reference code).

Each baseline maps a float32 chunk ``[L, 2, T, H, D]`` to (reconstruction, bits split into
payload and metadata). None of them is part of the product.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Result(NamedTuple):
    kv: np.ndarray
    payload_bits: float
    meta_bits: float


def fp16(kv: np.ndarray) -> Result:
    return Result(kv.astype(np.float16).astype(np.float32), 16.0 * kv.size, 0.0)


def int8_zstd(kv: np.ndarray, level: int = 19) -> Result:
    """Symmetric int8 per (layer, K/V, token, head), zstd over the int8 bytes."""
    import zstandard

    x = kv.astype(np.float16).astype(np.float32)
    scale = np.abs(x).max(axis=-1, keepdims=True) / 127.0
    scale = scale.astype(np.float16).astype(np.float32)
    safe = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    payload = len(zstandard.ZstdCompressor(level=level).compress(q.tobytes())) * 8
    return Result(q.astype(np.float32) * scale, float(payload), 16.0 * scale.size)


def _quant_asym(x: np.ndarray, bits: int, axis: int):
    mn = x.min(axis=axis, keepdims=True).astype(np.float16).astype(np.float32)
    mx = x.max(axis=axis, keepdims=True).astype(np.float16).astype(np.float32)
    levels = (1 << bits) - 1
    scale = (mx - mn) / levels
    safe = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.rint((x - mn) / safe), 0, levels)
    return q * scale + mn, 2 * mn.size


def kivi(kv: np.ndarray, bits: int, group: int = 32) -> Result:
    """KIVI: keys per-channel (groups of `group` tokens), values per-token (groups of
    `group` channels), asymmetric min/max, fp16 scale + zero per group. No fp16 residual window."""
    x = kv.astype(np.float16).astype(np.float32)
    L, _, T, H, D = x.shape
    k = x[:, 0].reshape(L, T // group, group, H * D)
    kq, kmeta = _quant_asym(k, bits, axis=2)
    v = x[:, 1].reshape(L, T, H * D // group, group)
    vq, vmeta = _quant_asym(v, bits, axis=3)
    out = np.stack([kq.reshape(L, T, H, D), vq.reshape(L, T, H, D)], axis=1)
    return Result(out, float(bits * x.size), 16.0 * (kmeta + vmeta))


def _lmcache_bins(layer: int, is_key: bool) -> int:
    if is_key:
        return 32 if layer < 10 else 16
    return 32 if layer < 2 else 16


def lmcache_cachegen(kv: np.ndarray) -> Result:
    """LMCache's CacheGen format re-implemented from its description: symmetric per-token
    quantisation (max over all channels of the token), 32 or 16 bins by layer, a 33-entry int16
    CDF per (layer, K/V, channel) fitted to the chunk and shipped; payload = the ideal code
    length of the symbols under those 16-bit CDFs, plus one fp16 scale per token."""
    x = kv.astype(np.float16).astype(np.float32)
    L, _, T, H, D = x.shape
    out = np.empty_like(x)
    payload = meta = 0.0
    for layer in range(L):
        for s in range(2):
            bins = _lmcache_bins(layer, s == 0)
            half = bins // 2
            m = x[layer, s].reshape(T, H * D)
            scale = (np.abs(m).max(axis=1, keepdims=True) / (half - 0.5)).astype(np.float16).astype(np.float32)
            safe = np.where(scale == 0, 1.0, scale)
            q = np.clip(np.floor(m / safe + 0.5), -half, half - 1).astype(np.int64)
            out[layer, s] = (q * scale).reshape(T, H, D)
            sym = q + half
            for c in range(H * D):
                counts = np.bincount(sym[:, c], minlength=bins)
                freq = np.maximum(np.round(counts / T * 65536), counts > 0).astype(np.float64)
                freq = freq * (65536.0 / freq.sum())
                payload += -(counts[counts > 0] * np.log2(freq[counts > 0] / 65536.0)).sum()
            meta += 33 * 16 * H * D + 16 * T
    return Result(out, payload, meta)


BASELINES = {
    "fp16": fp16,
    "int8+zstd": int8_zstd,
    "KIVI-4bit": lambda kv: kivi(kv, 4),
    "KIVI-2bit": lambda kv: kivi(kv, 2),
    "LMCache-CacheGen": lmcache_cachegen,
}
