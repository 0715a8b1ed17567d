"""The one chunk-header check, shared by the stream Put and the same-host ReserveWrite.

A header announces a chunk before its bytes arrive: key, token count, encoding, payload size,
key kind and (optionally) a CRC32C. ``validate_header`` checks it against the namespace and
the daemon's limits and returns the chunk's id and metadata; both data paths call it, so the
rules and the messages are the same whichever path a client uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore_wire.keys import KEY_BYTES

from .errors import InvalidArgument
from .namespaces import NamespaceInfo
from .types import ChunkId, ChunkMeta, Durability, Encoding, KeyKind


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """The fields of a PutChunkHeader / ReserveWrite chunk, as plain values (0 = unset)."""

    key: bytes
    num_tokens: int
    payload_bytes: int
    encoding: int = 0
    key_kind: int = 0
    crc32c: int = 0


def validate_header(info: NamespaceInfo, h: ChunkHeader, max_chunk_bytes: int, where: str) -> tuple[ChunkId, ChunkMeta]:
    """``(chunk id, metadata)`` of a well-formed header; InvalidArgument naming ``where``
    (e.g. ``chunk 3 (key 1a2b...)``) and the rule it broke otherwise.

    Rules: the key is a ``KEY_BYTES`` digest; ``1 <= num_tokens <= chunk_tokens``; a RAW chunk
    is exactly the namespace's tensor size for its tokens; every chunk is
    ``1..max_chunk_bytes``; encoding and key kind are known enum values. The metadata's
    ``crc32c`` is the header's (0 when the client sent none: the receiver fills it in).
    """
    if len(h.key) != KEY_BYTES:
        raise InvalidArgument(f"{where}: key is {len(h.key)} bytes; keys are {KEY_BYTES}-byte digests")
    ns = info.namespace
    if not 1 <= h.num_tokens <= ns.chunk_tokens:
        raise InvalidArgument(f"{where}: num_tokens={h.num_tokens}, must be 1..{ns.chunk_tokens} "
                              "(the namespace's chunk_tokens)")
    try:
        encoding = Encoding(h.encoding or Encoding.RAW)
        kind = KeyKind(h.key_kind or KeyKind.PREFIX)
    except ValueError as e:
        raise InvalidArgument(f"{where}: {e}") from None
    if encoding == Encoding.RAW:
        want = ns.chunk_bytes(h.num_tokens)
        if h.payload_bytes != want:
            raise InvalidArgument(
                f"{where}: payload_bytes={h.payload_bytes} but a RAW chunk of {h.num_tokens} tokens in this "
                f"namespace is {want} bytes (shape {list(ns.chunk_shape(h.num_tokens))}, {ns.dtype.name}); "
                "check the tensor's shape, dtype and layout against the namespace")
    if not 1 <= h.payload_bytes <= max_chunk_bytes:
        raise InvalidArgument(f"{where}: payload_bytes={h.payload_bytes}, must be 1..server.max_chunk_bytes="
                              f"{max_chunk_bytes}")
    meta = ChunkMeta(num_tokens=h.num_tokens, encoding=encoding, payload_bytes=h.payload_bytes,
                     crc32c=h.crc32c, key_kind=kind)
    return ChunkId(info.namespace_id + h.key), meta


def parse_durability(value: int, where: str = "durability") -> Durability:
    """The requested durability (0 = MEMORY); InvalidArgument for an unknown value."""
    try:
        return Durability(value or Durability.MEMORY)
    except ValueError as e:
        raise InvalidArgument(f"{where}: {e}; use MEMORY or PERSISTED") from None


def chunk_ids(info: NamespaceInfo, keys, max_keys: int) -> list[ChunkId]:
    """``namespace_id || key`` for each key, after checking count and lengths."""
    if len(keys) > max_keys:
        raise InvalidArgument(f"{len(keys)} keys in one request; the limit is server.max_keys_per_request="
                              f"{max_keys}: split the request")
    nid = info.namespace_id
    out = [ChunkId(nid + k) for k in keys]
    for i, c in enumerate(out):
        if len(c) != 2 * KEY_BYTES:
            raise InvalidArgument(f"keys[{i}] is {len(keys[i])} bytes; keys are {KEY_BYTES}-byte digests "
                                  "(docs/keys.md)")
    return out
