"""``SharedMemoryTier``: what the same-host path needs from the tier that owns shared memory.

Today only the DRAM arena implements it (``DramTier.shared_memory()``); a tier reports its
face through ``Tier.shared_memory()`` (None: nothing a local client could map). The store's
``LocalAccess`` talks to this protocol only, never to ``DramTier`` itself.

Threading: every method is thread-safe and none waits for another writer (``reserve`` of an
id being written returns None at once); ``reserve`` may evict, so it runs on worker threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..domain.types import ChunkId, ChunkMeta
from .base import ChunkRef


class Reservation(Protocol):
    """Writable pages for one not-yet-visible chunk (``dram.Reservation``)."""

    cid: ChunkId
    offset: int        #: byte offset in the arena
    nbytes: int
    view: memoryview   #: writable, exactly ``nbytes``
    #: ``(start, length)`` ranges of ``view`` that may hold older bytes (clear them first).
    stale: tuple[tuple[int, int], ...]


class SharedMemoryTier(Protocol):
    #: The file local clients map (``/dev/shm/...``).
    arena_path: Path
    arena_bytes: int
    #: Random bytes in the arena header that prove a client mapped this daemon's arena.
    nonce: bytes
    #: Where ``nonce`` starts in the arena header.
    nonce_offset: int

    def lease(self, cid: ChunkId) -> ChunkRef | None:
        """A read lease (no hit counted); the bytes stay put until it is released."""

    def contains(self, cid: ChunkId) -> bool:
        """Whether ``cid`` is committed here now (it may be gone by the next call)."""

    def get_unverified(self, cid: ChunkId) -> ChunkRef | None:
        """A read lease counted as a hit, without the tier's CRC32C check (for a reader that
        checks the bytes it copies itself); None when absent (no miss counted)."""

    def offset_of(self, ref: ChunkRef) -> int:
        """Arena offset of a lease's bytes (what a local client reads at)."""

    def reserve(self, cid: ChunkId, nbytes: int, same_host: bool = False) -> Reservation | None:
        """Pages for ``cid`` (evicting by policy); None if it is already stored or being
        written (never waits). The pages in ``Reservation.stale`` hold whatever was there
        before: clear them before anyone but the daemon may read them. ResourceExhausted when no room can be made or
        the tenant is over its quota (``same_host``: charged as reserved bytes until commit)."""

    def commit(self, res: Reservation, meta: ChunkMeta) -> None:
        """Publishes a filled reservation; ResourceExhausted (still reserved: abort it) when
        the tenant's DRAM quota cannot take it."""

    def rebind(self, res: Reservation, cid: ChunkId) -> bool:
        """Gives an uncommitted reservation the id ``cid`` (same namespace); False when
        ``cid`` is stored or being written already."""

    def abort(self, res: Reservation) -> None:
        """Gives back a reservation's pages."""
