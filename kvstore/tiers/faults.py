"""Fault injection as a composable wrapper: ``FaultyTier(inner, fail_get=0.5, delay_s=0.01)``.

Wraps any ``Tier`` and, before delegating, sleeps ``delay_s`` and raises ``Unavailable`` with
the given probabilities. Used by tests and chaos runs to show that the manager survives a
failing lower tier; never enabled in production config. ``rng`` makes runs reproducible.
The wrapper may be switched at run time by assigning its ``fail_*``/``delay_s`` attributes.
"""

from __future__ import annotations

import random
import time
from typing import Iterator

from ..errors import Unavailable
from ..types import ChunkId, ChunkMeta
from .base import ChunkRef, EntryInfo, Tier, TierStats


class FaultyTier(Tier):
    def __init__(self, inner: Tier, fail_get: float = 0.0, fail_put: float = 0.0,
                 fail_delete: float = 0.0, delay_s: float = 0.0, rng: random.Random | None = None) -> None:
        self.inner = inner
        self.medium = inner.medium
        self.fail_get = fail_get
        self.fail_put = fail_put
        self.fail_delete = fail_delete
        self.delay_s = delay_s
        self.injected = 0          # faults raised so far
        self._rng = rng or random.Random()

    def _maybe_fail(self, p: float, op: str) -> None:
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        if p > 0 and self._rng.random() < p:
            self.injected += 1
            raise Unavailable(f"injected fault in {type(self.inner).__name__}.{op}")

    def get(self, cid: ChunkId) -> ChunkRef | None:
        self._maybe_fail(self.fail_get, "get")
        return self.inner.get(cid)

    def put(self, cid: ChunkId, meta: ChunkMeta, payload) -> bool:
        self._maybe_fail(self.fail_put, "put")
        return self.inner.put(cid, meta, payload)

    def delete(self, cid: ChunkId) -> bool:
        self._maybe_fail(self.fail_delete, "delete")
        return self.inner.delete(cid)

    def contains(self, cid: ChunkId) -> bool:
        return self.inner.contains(cid)

    def evict(self, nbytes: int) -> list[ChunkId]:
        return self.inner.evict(nbytes)

    def scan(self, prefix: bytes = b"", after: bytes = b"", limit: int = 0) -> Iterator[EntryInfo]:
        return self.inner.scan(prefix, after, limit)

    def stats(self) -> TierStats:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()
