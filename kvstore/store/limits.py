"""Per-tenant limits the store and the lease table enforce, behind ONE small interface.

``TenantLimits`` is what callers use: ``acquire(tenant, resource, n)`` (ResourceExhausted
naming the config key when the tenant would go over), ``release(tenant, resource, n)`` and
``usage(tenant)``. The daemon's implementation is the quota ledger
(``kvstore.quotas.QuotaLedger``, built from ``[quotas]`` and per-token overrides): the one
source of every per-tenant limit.

``PinAccount`` tracks which chunks each tenant pinned through Lookup, for how long and at
what size, so pinned bytes are released when a pin expires (lazily, at the tenant's next
pinning Lookup).

Threading: thread-safe (one small lock each, never held while calling out).
Lock order: PinAccount._lock -> QuotaLedger._lock.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Mapping, Protocol, Sequence

from ..domain.types import ChunkId
from ..quotas import Resource

__all__ = ["PinAccount", "Resource", "TenantLimits"]


class TenantLimits(Protocol):
    def acquire(self, tenant: str, resource: Resource, n: int) -> None:
        """Counts ``n`` more of ``resource`` for ``tenant``; ResourceExhausted (nothing counted)
        naming the config key when that would exceed the tenant's limit."""

    def release(self, tenant: str, resource: Resource, n: int) -> None:
        """Gives back ``n`` of what ``acquire`` counted."""

    def usage(self, tenant: str) -> Mapping[Resource, int]:
        """What the tenant holds now."""


class PinAccount:
    """Pins taken through Lookup, per tenant: chunk -> (expiry, bytes counted)."""

    def __init__(self, limits: TenantLimits, clock: Callable[[], float] = time.time) -> None:
        self._limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._pins: dict[str, dict[ChunkId, tuple[float, int]]] = {}

    def charge(self, tenant: str, cids: Sequence[ChunkId], ttl_s: float, chunk_bytes: int) -> None:
        """Counts ``chunk_bytes`` per chunk newly pinned by ``tenant`` for ``ttl_s`` (a chunk it
        already has pinned only gets the later expiry). ResourceExhausted when over the
        tenant's pinned-bytes limit: nothing is counted then, and the caller pins nothing."""
        now = self._clock()
        until = now + ttl_s
        with self._lock:
            mine = self._pins.setdefault(tenant, {})
            expired = [c for c, (exp, _) in mine.items() if exp <= now]
            freed = sum(mine.pop(c)[1] for c in expired)
            if freed:
                self._limits.release(tenant, Resource.PINNED_BYTES, freed)
            new = [c for c in dict.fromkeys(cids) if c not in mine]
            if new:
                self._limits.acquire(tenant, Resource.PINNED_BYTES, chunk_bytes * len(new))
            for c in new:
                mine[c] = (until, chunk_bytes)
            for c in cids:
                exp, n = mine[c]
                mine[c] = (max(exp, until), n)
            if not mine:
                del self._pins[tenant]
