"""Namespace ids, chained prefix keys and position-independent chunk keys.

This module is the reference implementation of docs/keys.md (version 1). Every byte that
goes into a hash is spelled out there; change nothing here without a new spec version and
new test vectors (tests/vectors/keys_v1.json).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

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

try:   # the native chain (kvstore-native's kvs_prefix_keys): the same bytes, 1.2-1.6x faster
    from kvstore_native import prefix_keys as _native_chain
    _native_chain(bytes(32), b"", 1)   # loads the library (NativeLibraryMissing is an ImportError)
except ImportError:
    _native_chain = None


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


class PrefixKeys(Sequence):
    """The chained prefix keys of ``tokens``' leading full chunks (and of the trailing partial
    one if asked), computed in order only as far as they are read and kept: ``len`` is known
    at once, ``keys[i]`` / ``keys[lo:hi]`` / iteration hash up to what they touch. A loader
    can then overlap hashing the later chunks with moving the earlier ones (the GPU path's
    HBM loads). The keys are ``prefix_keys``'s; a bad token id raises ``ValueError`` when
    the chunk holding it is first reached (an integer numpy array is checked whole at once)."""

    __slots__ = ("_tokens", "_chunk", "_end", "_n", "_keys", "_prev")

    def __init__(self, namespace_id: bytes, tokens: Sequence[int], chunk_tokens: int,
                 *, include_partial: bool = False) -> None:
        if chunk_tokens <= 0:
            raise ValueError("chunk_tokens must be positive")
        if not hasattr(tokens, "__len__") or not hasattr(tokens, "__getitem__"):
            tokens = list(tokens)
        end = len(tokens) if include_partial else len(tokens) - len(tokens) % chunk_tokens
        if isinstance(tokens, np.ndarray):
            tokens = _tokens(tokens[:end])   # checked and packed whole (bytes)
        self._tokens = tokens
        self._chunk = chunk_tokens
        self._end = end
        self._n = -(-end // chunk_tokens)
        self._keys: list[Key] = []
        self._prev: bytes = root_key(namespace_id)

    def __len__(self) -> int:
        return self._n

    def _upto(self, hi: int) -> None:
        """Hashes the keys up to (not including) chunk ``hi``: their token bytes packed once,
        each chunk's hashed as a slice of them."""
        lo = len(self._keys)
        if hi <= lo:
            return
        c, t = self._chunk, self._tokens
        first, last = lo * c, min(hi * c, self._end)
        if isinstance(t, bytes):
            packed = t if first == 0 and 4 * last == len(t) else t[4 * first:4 * last]
        else:
            packed = _tokens(t[first:last])
        keys = self._keys
        if _native_chain is not None:
            out = _native_chain(self._prev, packed, c)
            keys.extend([out[i:i + KEY_BYTES] for i in range(0, len(out), KEY_BYTES)])
            self._prev = keys[-1]
            return
        full = struct.pack("<I", c)
        prev, packed = self._prev, memoryview(packed)
        for start in range(0, last - first, c):
            stop = min(start + c, last - first)
            prev = _h(prev, full if stop - start == c else struct.pack("<I", stop - start),
                      packed[4 * start:4 * stop])
            keys.append(Key(prev))
        self._prev = prev

    def __getitem__(self, i):
        if isinstance(i, slice):
            lo, hi, step = i.indices(self._n)
            self._upto(hi if step > 0 else lo + 1)
            return self._keys[i]
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexError("prefix key index out of range")
        self._upto(j + 1)
        return self._keys[j]

    def __iter__(self):
        for i in range(self._n):
            self._upto(i + 1)
            yield self._keys[i]

    def computed(self) -> int:
        """How many leading keys are hashed so far."""
        return len(self._keys)


def prefix_keys(namespace_id: bytes, tokens: Sequence[int], chunk_tokens: int,
                *, include_partial: bool = False) -> list[Key]:
    """Chained keys of the leading full chunks of ``tokens`` (and the trailing partial one if asked)."""
    return PrefixKeys(namespace_id, tokens, chunk_tokens, include_partial=include_partial)[:]


def chunk_key(namespace_id: bytes, tokens: Sequence[int]) -> Key:
    """Position-independent key: ``H(tag || namespace_id || u32le(n) || tokens)``."""
    _check_id(namespace_id)
    if not tokens:
        raise ValueError("a chunk needs at least one token")
    return Key(_h(_CHUNK_TAG, namespace_id, struct.pack("<I", len(tokens)), _tokens(tokens)))


def _check_id(namespace_id: bytes) -> None:
    if not isinstance(namespace_id, (bytes, bytearray)) or len(namespace_id) != KEY_BYTES:
        raise ValueError(f"namespace_id must be {KEY_BYTES} bytes")
