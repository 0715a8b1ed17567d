"""Namespace ids, chained prefix keys and position-independent chunk keys.

This module is the reference implementation of docs/keys.md (version 1). Every byte that
goes into a hash is spelled out there; change nothing here without a new spec version and
new test vectors (tests/vectors/keys_v1.json).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import NewType, Sequence

import numpy as np

from .types import DType, Layout

#: 32-byte BLAKE2b-256 digest.
Key = NewType("Key", bytes)
NamespaceId = NewType("NamespaceId", bytes)

KEY_BYTES = 32
SPEC_VERSION = 1
_NS_TAG = b"kvstore.ns.v1\x00"
_PREFIX_TAG = b"kvstore.prefix.v1\x00"
_CHUNK_TAG = b"kvstore.chunk.v1\x00"
_MAX_U32 = 0xFFFFFFFF


def _h(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for p in parts:
        h.update(p)
    return h.digest()


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<I", len(b)) + b


@dataclass(frozen=True, slots=True)
class Namespace:
    """Everything that makes KV incompatible. ``tenant`` is set by the daemon from the credential."""

    model: str
    dtype: DType
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout: Layout = Layout.LAYER_KV_TOKEN_HEAD_DIM
    tp_rank: int = 0
    tp_size: int = 1
    chunk_tokens: int = 256
    tenant: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", DType.parse(self.dtype))
        object.__setattr__(self, "layout", Layout(self.layout))
        problems = []
        if not self.model:
            problems.append("model must be a non-empty model identity")
        for name in ("num_layers", "num_kv_heads", "head_dim", "chunk_tokens", "tp_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 < v <= _MAX_U32:
                problems.append(f"{name} must be an integer in 1..2^32-1, got {v!r}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < max(1, int(self.tp_size or 1)):
            problems.append(f"tp_rank must be in 0..tp_size-1, got {self.tp_rank!r}")
        if self.layout == Layout.MLA_LATENT and self.num_kv_heads != 1:
            problems.append("MLA_LATENT layout needs num_kv_heads == 1")
        if problems:
            raise ValueError("invalid namespace: " + "; ".join(problems))

    def canonical_bytes(self) -> bytes:
        return b"".join((
            _NS_TAG,
            _str(self.model),
            struct.pack("<BIII", int(self.dtype), self.num_layers, self.num_kv_heads, self.head_dim),
            struct.pack("<BIII", int(self.layout), self.tp_rank, self.tp_size, self.chunk_tokens),
            _str(self.tenant),
        ))

    @property
    def namespace_id(self) -> NamespaceId:
        return NamespaceId(_h(self.canonical_bytes()))

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's KV across all layers (RAW encoding)."""
        per_layer = self.num_kv_heads * self.head_dim * (1 if self.layout == Layout.MLA_LATENT else 2)
        return self.num_layers * per_layer * self.dtype.itemsize

    def chunk_bytes(self, num_tokens: int | None = None) -> int:
        return self.token_bytes * (self.chunk_tokens if num_tokens is None else num_tokens)

    def chunk_shape(self, num_tokens: int | None = None) -> tuple[int, ...]:
        n = self.chunk_tokens if num_tokens is None else num_tokens
        if self.layout == Layout.MLA_LATENT:
            return (self.num_layers, n, self.head_dim)
        return (self.num_layers, 2, n, self.num_kv_heads, self.head_dim)


def _tokens(tokens: Sequence[int]) -> bytes:
    """``u32le`` of each token id, concatenated (an integer numpy array: converted whole)."""
    if isinstance(tokens, np.ndarray) and tokens.dtype.kind in "iu":
        if tokens.ndim != 1:
            raise ValueError("token ids must be a flat sequence of integers")
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > _MAX_U32):
            raise ValueError("token ids must be integers in 0..2^32-1")
        return tokens.astype("<u4", copy=False).tobytes()
    try:
        return struct.pack(f"<{len(tokens)}I", *tokens)
    except struct.error:
        raise ValueError("token ids must be integers in 0..2^32-1") from None


def root_key(namespace_id: bytes) -> Key:
    """``key_0``: the chain's root. Never stored; only hashed into ``key_1``."""
    _check_id(namespace_id)
    return Key(_h(_PREFIX_TAG, namespace_id))


def next_prefix_key(previous: bytes, chunk: Sequence[int]) -> Key:
    """``key_i = H(key_{i-1} || u32le(n) || tokens)``."""
    if not 0 < len(chunk):
        raise ValueError("a chunk needs at least one token")
    return Key(_h(previous, struct.pack("<I", len(chunk)), _tokens(chunk)))


def prefix_keys(namespace_id: bytes, tokens: Sequence[int], chunk_tokens: int,
                *, include_partial: bool = False) -> list[Key]:
    """Chained keys of the leading full chunks of ``tokens`` (and the trailing partial one if asked)."""
    if chunk_tokens <= 0:
        raise ValueError("chunk_tokens must be positive")
    if not hasattr(tokens, "__len__") or not hasattr(tokens, "__getitem__"):
        tokens = list(tokens)
    keys: list[Key] = []
    prev: bytes = root_key(namespace_id)
    end = len(tokens) if include_partial else len(tokens) - len(tokens) % chunk_tokens
    # Every chunk's token bytes, packed once (next_prefix_key's bytes), hashed in place.
    packed = memoryview(_tokens(tokens[:end] if end < len(tokens) else tokens))
    full = struct.pack("<I", chunk_tokens)
    for start in range(0, end, chunk_tokens):
        stop = min(start + chunk_tokens, end)
        prev = _h(prev, full if stop - start == chunk_tokens else struct.pack("<I", stop - start),
                  packed[4 * start:4 * stop])
        keys.append(Key(prev))
    return keys


def chunk_key(namespace_id: bytes, tokens: Sequence[int]) -> Key:
    """Position-independent key: ``H(tag || namespace_id || u32le(n) || tokens)``."""
    _check_id(namespace_id)
    if not tokens:
        raise ValueError("a chunk needs at least one token")
    return Key(_h(_CHUNK_TAG, namespace_id, struct.pack("<I", len(tokens)), _tokens(tokens)))


def _check_id(namespace_id: bytes) -> None:
    if not isinstance(namespace_id, (bytes, bytearray)) or len(namespace_id) != KEY_BYTES:
        raise ValueError(f"namespace_id must be {KEY_BYTES} bytes")
