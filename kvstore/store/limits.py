"""Per-tenant limits the store and the lease table enforce, behind ONE small interface.

``TenantLimits`` is what callers use: ``acquire(tenant, resource, n)`` (ResourceExhausted
naming the config key when the tenant would go over), ``release(tenant, resource, n)`` and
``usage(tenant)``. ``TenantCounters`` is the simple in-process implementation built from
``server.*`` settings; the quota model's ledger (``kvstore.quotas.QuotaLedger``) has the same
three methods and replaces it in ``Store.open`` (one line) when it lands.

``PinAccount`` tracks which chunks each tenant pinned through Lookup, for how long and at
what size, so pinned bytes are released when a pin expires (lazily, at the tenant's next
pinning Lookup).

Threading: both are thread-safe (one small lock each, never held while calling out).
Lock order: PinAccount._lock -> TenantCounters._lock.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

from ..domain.errors import ResourceExhausted
from ..domain.types import ChunkId


class Resource(str, enum.Enum):
    PINNED_BYTES = "pinned_bytes"
    OPEN_LEASES = "open_leases"
    OPEN_RESERVATIONS = "open_reservations"


@dataclass(frozen=True)
class Limit:
    amount: int
    #: The setting that raises it, quoted in the error.
    config_key: str
    #: What is counted, for the error message ("bytes pinned", "open read leases").
    what: str


class TenantLimits(Protocol):
    def acquire(self, tenant: str, resource: Resource, n: int) -> None:
        """Counts ``n`` more of ``resource`` for ``tenant``; ResourceExhausted (nothing counted)
        naming the config key when that would exceed the tenant's limit."""

    def release(self, tenant: str, resource: Resource, n: int) -> None:
        """Gives back ``n`` of what ``acquire`` counted."""

    def usage(self, tenant: str) -> Mapping[Resource, int]:
        """What the tenant holds now."""


class TenantCounters:
    """The same limit for every tenant, counted in memory."""

    def __init__(self, limits: Mapping[Resource, Limit]) -> None:
        self._limits = dict(limits)
        self._lock = threading.Lock()
        self._used: dict[tuple[str, Resource], int] = {}

    @classmethod
    def from_config(cls, server) -> "TenantCounters":
        return cls({
            Resource.PINNED_BYTES: Limit(server.max_pinned_bytes_per_tenant, "server.max_pinned_bytes_per_tenant",
                                         "bytes pinned"),
            Resource.OPEN_LEASES: Limit(server.max_open_leases_per_tenant, "server.max_open_leases_per_tenant",
                                        "open same-host read leases"),
            Resource.OPEN_RESERVATIONS: Limit(server.max_open_reservations_per_tenant,
                                              "server.max_open_reservations_per_tenant",
                                              "open same-host reservations (uncommitted chunks)"),
        })

    def acquire(self, tenant: str, resource: Resource, n: int) -> None:
        lim = self._limits.get(resource)
        with self._lock:
            cur = self._used.get((tenant, resource), 0)
            if lim is not None and cur + n > lim.amount:
                raise ResourceExhausted(
                    f"tenant {tenant!r} holds {cur} {lim.what} and asked for {n} more; the limit is "
                    f"{lim.config_key}={lim.amount}. Release what you hold (Release, or let pins expire), "
                    "or ask the operator to raise the limit")
            self._used[(tenant, resource)] = cur + n

    def release(self, tenant: str, resource: Resource, n: int) -> None:
        with self._lock:
            left = self._used.get((tenant, resource), 0) - n
            assert left >= 0, f"{resource.value} of tenant {tenant!r} released twice"
            if left:
                self._used[(tenant, resource)] = left
            else:
                self._used.pop((tenant, resource), None)

    def usage(self, tenant: str) -> dict[Resource, int]:
        with self._lock:
            return {r: n for (t, r), n in self._used.items() if t == tenant}


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
