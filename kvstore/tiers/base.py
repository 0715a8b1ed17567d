"""The tier interface: five primitives, batch defaults, and the read lease.

Threading contract (every implementation): all methods are thread-safe and may be called
from the event-loop thread and from worker threads at once. Methods of an in-memory tier
never block on I/O; a disk tier's ``get``/``put`` do file I/O and are called from worker
threads by the manager, never from the event loop.

Ownership: ``put`` copies the payload in before returning; the caller may reuse its buffer.
``get`` returns a ``ChunkRef`` lease: its ``view`` stays valid and unchanged until
``release()`` (or the ``with`` block ends); a tier never evicts, moves or reuses the bytes
of a leased chunk. Forgetting to release leaks the space until the process ends, so callers
use ``with``.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from ..domain.types import ChunkId, ChunkMeta, Medium


class ChunkRef:
    """A read lease on one stored chunk: ``meta`` and a read-only ``view`` of its payload."""

    __slots__ = ("cid", "meta", "view", "medium", "_release", "_released")

    def __init__(self, cid: ChunkId, meta: ChunkMeta, view: memoryview, medium: Medium,
                 release: Callable[[], None] | None = None) -> None:
        self.cid = cid
        self.meta = meta
        self.view = view
        self.medium = medium
        self._release = release
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.view = memoryview(b"")
            if self._release is not None:
                self._release()

    def __enter__(self) -> "ChunkRef":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # last resort; callers release explicitly
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


@dataclass(slots=True)
class TierStats:
    """Plain counters a tier keeps; the metrics exporter and the Admin service read them."""

    medium: Medium
    policy: str
    capacity_bytes: int
    used_bytes: int = 0
    chunks: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    corrupt: int = 0
    pinned_chunks: int = 0


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """One chunk as listed by ``Tier.scan`` (admin listing and inspection)."""

    cid: ChunkId
    meta: ChunkMeta
    last_access_s: float
    hits: int


@dataclass(frozen=True, slots=True)
class Fetched:
    """A chunk handed back by a prefix source (``Tier.fetch_prefix``): a private copy."""

    cid: ChunkId
    meta: ChunkMeta
    payload: object


class PinTable:
    """Chunks protected from eviction, with optional expiry (unix seconds; 0 = none).

    Shared by every tier of a manager: a tier's eviction skips ``is_pinned(cid)`` chunks.
    Lock order: a tier may call ``is_pinned`` while holding its own lock; PinTable never
    calls into a tier, so there is no cycle.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._pins: dict[ChunkId, float] = {}
        self._lock = threading.Lock()

    def pin(self, cid: ChunkId, ttl_s: float = 0) -> None:
        with self._lock:
            self._pins[cid] = self._clock() + ttl_s if ttl_s > 0 else 0.0

    def unpin(self, cid: ChunkId) -> bool:
        with self._lock:
            return self._pins.pop(cid, None) is not None

    def extend(self, cid: ChunkId, ttl_s: float) -> None:
        """Pins ``cid`` for at least ``ttl_s`` more seconds: never shortens an existing pin and
        never turns a pin without expiry into one with expiry (lookups pin with this)."""
        with self._lock:
            cur = self._pins.get(cid)
            if cur == 0.0:
                return
            self._pins[cid] = max(cur or 0.0, self._clock() + ttl_s)

    def unpin_prefix(self, prefix: bytes) -> int:
        """Drops the pins of every id starting with ``prefix``; returns how many."""
        with self._lock:
            gone = [c for c in self._pins if c.startswith(prefix)]
            for c in gone:
                del self._pins[c]
            return len(gone)

    def expiry(self, cid: ChunkId) -> float | None:
        """Expiry time, 0.0 for no expiry, None when not pinned (expired pins are dropped)."""
        with self._lock:
            exp = self._pins.get(cid)
            if exp is None:
                return None
            if exp and exp <= self._clock():
                del self._pins[cid]
                return None
            return exp

    def is_pinned(self, cid: ChunkId) -> bool:
        return self.expiry(cid) is not None

    def __len__(self) -> int:
        with self._lock:
            now = self._clock()
            return sum(1 for e in self._pins.values() if not e or e > now)


class Tier(abc.ABC):
    """One storage medium. Implementations override the five primitives and ``scan``/``stats``;
    the batch methods have loop defaults a tier may override for speed."""

    medium: Medium
    #: Told ``(cid, medium, present)`` whenever a chunk becomes visible in or leaves this tier
    #: (the presence index listens). Called with the tier's lock held: it must be quick,
    #: must not block and must not call back into the tier.
    listener: Callable[[ChunkId, Medium, bool], None] | None = None

    def _notify(self, cid: ChunkId, present: bool) -> None:
        if self.listener is not None:
            self.listener(cid, self.medium, present)

    @abc.abstractmethod
    def get(self, cid: ChunkId) -> ChunkRef | None:
        """A lease on the chunk, or None if absent. A chunk whose checksum fails is deleted,
        counted in ``stats().corrupt`` and reported as absent: corrupt bytes are never returned."""

    @abc.abstractmethod
    def put(self, cid: ChunkId, meta: ChunkMeta, payload: memoryview | bytes) -> bool:
        """Stores a copy; False if ``cid`` is already present (chunks are immutable).
        Evicts by policy to make room; raises ResourceExhausted when it cannot (everything
        pinned or leased, or the chunk is larger than the tier)."""

    @abc.abstractmethod
    def contains(self, cid: ChunkId) -> bool:
        """Presence without touching recency or hit counters."""

    @abc.abstractmethod
    def delete(self, cid: ChunkId) -> bool:
        """Removes the chunk (space is reclaimed once no lease holds it); False if absent."""

    @abc.abstractmethod
    def evict(self, nbytes: int) -> list[ChunkId]:
        """Evicts unpinned, unleased chunks by policy until ``nbytes`` are free; returns them."""

    @abc.abstractmethod
    def scan(self, prefix: bytes = b"", after: bytes = b"", limit: int = 0) -> Iterator[EntryInfo]:
        """Entries whose id starts with ``prefix``, in id order, strictly after ``after``."""

    @abc.abstractmethod
    def stats(self) -> TierStats:
        ...

    def close(self) -> None:
        """Releases resources; the tier is unusable afterwards."""

    # Optional capabilities, with defaults any tier may keep.
    def scrub(self, progress=None):
        """Verifies every stored chunk now against its checksum (``kvctl verify``), dropping
        and counting the corrupt ones; ``progress`` is called with the running report. Returns
        the final report, or None for a medium that has no at-rest check (memory tiers verify
        on read instead)."""
        return None

    def peek(self, cid: ChunkId) -> ChunkRef | None:
        """A lease like ``get`` that need not count a hit or touch recency (the chain uses it
        to copy a chunk into a lower tier). Default: ``get``."""
        return self.get(cid)

    #: Whether ``fetch_prefix`` answers (a remote level): the chain asks such a level for
    #: the rest of a prefix that the levels above miss, from a worker thread.
    serves_prefixes: bool = False

    def fetch_prefix(self, cids: Sequence[ChunkId]) -> list[Fetched]:
        """The longest leading run of ``cids`` this tier holds, as private copies, in one
        batch (worker threads; bounded by the tier's deadline, never raises for a failure of
        the medium: the run is shorter). Default: none."""
        return []

    def shared_memory(self):
        """The ``tiers.shared.SharedMemoryTier`` face of this tier when same-host clients can
        map its memory (the DRAM arena), else None (the default)."""
        return None

    def device_pool(self):
        """The ``tiers.hbm.HbmTier`` face (``export`` + ``lease``) when same-host GPU clients can
        map this tier's device memory (the HBM tier), else None (the default)."""
        return None

    # Batch defaults.
    def contains_many(self, cids: Iterable[ChunkId]) -> list[bool]:
        return [self.contains(c) for c in cids]

    def delete_many(self, cids: Iterable[ChunkId]) -> int:
        return sum(1 for c in cids if self.delete(c))

    def delete_prefix(self, prefix: bytes) -> int:
        return self.delete_many([e.cid for e in list(self.scan(prefix))])

    def clear(self) -> int:
        return self.delete_prefix(b"")
