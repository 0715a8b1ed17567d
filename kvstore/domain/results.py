"""Typed outcomes the chain and the store return (compare enums by identity, never by name)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .types import ChunkId, ChunkMeta, Medium


class PutResult(enum.Enum):
    STORED = "stored"      #: this call stored the chunk
    EXISTED = "existed"    #: the chunk was already stored (chunks are immutable)


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The leading run of present chunks of a lookup: one medium per matched id."""

    media: tuple[Medium, ...]

    @property
    def matched(self) -> int:
        return len(self.media)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    cid: ChunkId
    meta: ChunkMeta
    #: Media holding the chunk, fastest first.
    media: tuple[Medium, ...]
    #: Pin expiry (unix s), 0.0 pinned without expiry, None not pinned.
    pin_expires_s: float | None
    last_access_s: float
    hits: int
