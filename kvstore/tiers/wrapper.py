"""``TierWrapper``: a tier that delegates every call to an inner tier (a decorator base).

Wrappers (fault injection, codec conversion) subclass it and override only what they change,
so the chain composes ``FaultyTier(CodecTier(DiskTier(...)))`` without knowing any of them.
Change events are the inner tier's: setting ``listener`` on a wrapper sets it on the tier
that actually stores the bytes (the one that knows when a chunk appears or leaves).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from ..domain.types import ChunkId, ChunkMeta, Medium
from .base import ChunkRef, EntryInfo, Tier, TierStats


class TierWrapper(Tier):
    def __init__(self, inner: Tier) -> None:
        self.inner = inner
        self.medium = inner.medium
        self.serves_prefixes = inner.serves_prefixes

    @property
    def listener(self) -> Callable[[ChunkId, Medium, bool], None] | None:  # type: ignore[override]
        return self.inner.listener

    @listener.setter
    def listener(self, fn: Callable[[ChunkId, Medium, bool], None] | None) -> None:
        self.inner.listener = fn

    def get(self, cid: ChunkId) -> ChunkRef | None:
        return self.inner.get(cid)

    def peek(self, cid: ChunkId) -> ChunkRef | None:
        return self.inner.peek(cid)

    def put(self, cid: ChunkId, meta: ChunkMeta, payload) -> bool:
        return self.inner.put(cid, meta, payload)

    def contains(self, cid: ChunkId) -> bool:
        return self.inner.contains(cid)

    def delete(self, cid: ChunkId) -> bool:
        return self.inner.delete(cid)

    def evict(self, nbytes: int) -> list[ChunkId]:
        return self.inner.evict(nbytes)

    def delete_prefix(self, prefix: bytes) -> int:
        # A shared store (the remote tier) deletes by its own index, since it lists nothing;
        # any other tier as the base does (scan, then this wrapper's delete).
        return self.inner.delete_prefix(prefix) if self.serves_prefixes else super().delete_prefix(prefix)

    def scan(self, prefix: bytes = b"", after: bytes = b"", limit: int = 0) -> Iterator[EntryInfo]:
        return self.inner.scan(prefix, after, limit)

    def stats(self) -> TierStats:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()

    def scrub(self, progress=None):
        return self.inner.scrub(progress)

    def contains_many(self, cids: Iterable[ChunkId]) -> list[bool]:
        return self.inner.contains_many(cids)

    def shared_memory(self):
        return self.inner.shared_memory()

    def fetch_prefix(self, cids):
        return self.inner.fetch_prefix(cids)
