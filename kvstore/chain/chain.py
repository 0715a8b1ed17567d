"""``TierChain``: an ordered list of tiers, fastest first, composed generically.

- Lookup walks the chain and answers with the first tier holding the chunk.
- A ``get`` hit in a lower tier is copied into the faster tiers above it when
  ``Level.promote`` says so (served from where it was found either way).
- A put lands in the first tier and goes down link by link: ``WRITE_THROUGH`` on the caller's
  thread, ``WRITE_BEHIND`` through the link's bounded ``WriteBehind`` queue. A PERSISTED put
  is written through every link down to the first durable tier before it returns.
- Backpressure never fails a put because of write-behind: when a tier has no room for a
  foreground write, its outgoing queue gives back its leases first (``with_room``); a MEMORY
  put the first tier still cannot take is stored in a lower tier (``_spill``).
- ``get`` serves only verified bytes: a tier reports a chunk whose checksum fails as a miss
  (after dropping it), and the walk goes on to the tiers below.
- Pins (one ``PinTable`` shared by every tier) protect chunks from eviction, with a TTL.

The chain never names a medium: tiers come from ``chain.build`` (the registry), wrappers
(codec, faults) are tiers too, and same-host access goes through ``shared_memory()``.

Who calls what, from which thread:

- the event-loop thread: ``lookup``, ``locate``, ``pin``, ``unpin``, ``entries``,
  ``inspect``, ``stats`` (in-memory only, never block on I/O; a disk tier's ``contains`` and
  ``scan`` read its in-memory index);
- worker threads: ``put``, ``get``, ``fill_prefix``, ``delete``, ``delete_prefix``, ``evict``, ``flush``,
  ``close``, ``stored_in``, ``write_below`` (may do file I/O or wait);
- each write-behind link's writer thread: ``_write_behind``.

Lock order: ``TierChain._lock`` (counters only, never held during I/O) and
``WriteBehind._lock`` are leaves above the tier locks -> ``PinTable._lock``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from .. import config as cfg
from ..domain.errors import FailedPrecondition, KVStoreError, ResourceExhausted, Unavailable
from ..quotas import QuotaExceeded
from ..domain.results import KeyInfo, PutResult
from ..domain.types import ChunkId, ChunkMeta, Durability, Medium
from ..tiers.base import ChunkRef, EntryInfo, PinTable, Tier, TierStats
from ..tiers.registry import DEFAULT_WRITE_QUEUE_CHUNKS
from .writeback import WRITE_BEHIND_SOURCE_FRACTION, WriteBehind

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long ``close`` waits for each link's queued copies before dropping them (seconds).
#: Sized for a full default queue (256 chunks of tens of MB) on a slow SSD.
CLOSE_DRAIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Level:
    """One tier of the chain and the policies of the link into it from above."""

    tier: Tier
    #: Whether chunks stored here survive a restart (PERSISTED needs one durable level).
    durable: bool
    #: How MEMORY puts reach this level from the one above (ignored for the first level).
    write_mode: cfg.WriteMode = cfg.WriteMode.WRITE_BEHIND
    #: Bound of the write-behind queue into this level (chunks).
    write_queue_chunks: int = DEFAULT_WRITE_QUEUE_CHUNKS
    #: Copy hits found below this level into it.
    promote: bool = True
    #: Bound of that queue in bytes, as a fraction of the level above's capacity
    #: (``chain.write_behind_fraction``).
    write_queue_fraction: float = WRITE_BEHIND_SOURCE_FRACTION

    @property
    def medium(self) -> Medium:
        return self.tier.medium


@dataclass(frozen=True)
class ChainStats:
    tiers: list[TierStats]
    write_queue_depth: int
    #: Lower-tier copies skipped (write-behind queue full or over its byte budget, or the
    #: chunk was evicted before it could be queued); the chunk stayed in the tier above.
    write_queue_dropped: int
    pinned_chunks: int
    #: Lower-tier writes that failed (write-behind, write-through or PERSISTED).
    write_errors: int = 0
    #: Lower-tier reads that failed with an I/O error and were served as misses.
    read_errors: int = 0
    #: Hits that could not be promoted (no room above); served from where they were found.
    promotions_skipped: int = 0
    #: MEMORY puts the first tier had no room for, stored in a lower tier instead.
    spilled: int = 0


class TierChain:
    """Composes ``levels`` (fastest first) that share ``pins``. Owns and closes the tiers."""

    def __init__(self, levels: Sequence[Level], pins: PinTable) -> None:
        if not levels:
            raise FailedPrecondition("a tier chain needs at least one tier")
        self.levels = tuple(levels)
        self.pins = pins
        self._lock = threading.Lock()
        self._write_errors = 0
        self._read_errors = 0
        self._promotions_skipped = 0
        self._spilled = 0
        self._closed = False
        # _links[i] carries copies from level i to level i + 1 (None: write-through).
        self._links: list[WriteBehind | None] = []
        for i, lower in enumerate(self.levels[1:]):
            upper = self.levels[i]
            if lower.write_mode is cfg.WriteMode.WRITE_BEHIND:
                budget = int(upper.tier.stats().capacity_bytes * lower.write_queue_fraction)
                self._links.append(WriteBehind(
                    upper.tier, lambda cid, ref, i=i: self._write_behind(i, cid, ref), lower.write_queue_chunks,
                    budget, name=f"kvstore-writer-{upper.medium.name.lower()}-{lower.medium.name.lower()}"))
            else:
                self._links.append(None)
        shared = [i for i, lv in enumerate(self.levels) if lv.tier.shared_memory() is not None]
        #: Index of the level whose memory same-host clients map, or None.
        self.shared_level: int | None = shared[0] if shared else None
        #: Whether a level can fill a missed prefix in one batch (``Tier.fetch_prefix``):
        #: callers on the event loop check this before going to a worker for ``fill_prefix``.
        self.serves_prefixes = any(lv.tier.serves_prefixes for lv in self.levels)

    def set_listener(self, fn: Callable[[ChunkId, Medium, bool], None] | None) -> None:
        """Tells ``fn(cid, medium, present)`` about every change in every tier (see
        ``Tier.listener`` for what it may do)."""
        for lv in self.levels:
            lv.tier.listener = fn

    def _count(self, field: str) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + 1)

    def _tiers(self, medium: Medium | None = None) -> list[Tier]:
        return [lv.tier for lv in self.levels if medium is None or lv.medium == medium]

    # -- lookups (non-blocking) ----------------------------------------------------------------
    def medium_of(self, cid: ChunkId) -> Medium | None:
        """The fastest medium holding ``cid``, or None."""
        for lv in self.levels:
            if lv.tier.contains(cid):
                return lv.medium
        return None

    def lookup(self, cids: Sequence[ChunkId], pin_ttl_s: float = 0) -> list[Medium]:
        """Media of the leading run of present ids (stops at the first miss). With
        ``pin_ttl_s > 0`` the matched ids are pinned for at least that long, so the caller can
        fetch them before eviction takes them."""
        out: list[Medium] = []
        for cid in cids:
            m = self.medium_of(cid)
            if m is None:
                break
            out.append(m)
        if pin_ttl_s > 0:
            for cid in cids[:len(out)]:
                self.pins.extend(cid, pin_ttl_s)
        return out

    def locate(self, cids: Sequence[ChunkId]) -> list[Medium | None]:
        return [self.medium_of(c) for c in cids]

    # -- writes ---------------------------------------------------------------------------------
    def check_put(self, durability: Durability) -> bool:
        if self._closed:
            raise FailedPrecondition("the tier chain is closed")
        persist = durability == Durability.PERSISTED
        if persist and not any(lv.durable for lv in self.levels):
            raise Unavailable("PERSISTED durability needs a durable tier in the chain; set disk.enabled = true "
                              "(and keep 'disk' in chain.tiers) or store with MEMORY durability")
        return persist

    def put(self, cid: ChunkId, meta: ChunkMeta, payload, durability: Durability) -> PutResult:
        """Stores the chunk (copying ``payload``) in the first tier and down the chain by
        policy. PERSISTED: written through to the first durable tier before returning
        (Unavailable if there is none or it fails). Raises ResourceExhausted when the first
        tier cannot make room (after the write-behind queue out of it gave its leases back)
        and no lower tier takes the chunk instead (``_spill``)."""
        persist = self.check_put(durability)
        if self.medium_of(cid) is not None:
            if persist and not any(lv.durable and lv.tier.contains(cid) for lv in self.levels):
                self.write_below(0, cid, meta, payload, persist=True, from_top=True)
            return PutResult.EXISTED
        try:
            stored = self.with_room(0, lambda: self.levels[0].tier.put(cid, meta, payload))
        except ResourceExhausted as full:
            if persist:
                return PutResult.STORED if self.write_below(0, cid, meta, payload, persist=True) else PutResult.EXISTED
            return self._spill(cid, meta, payload, full)
        if stored or persist:
            self.write_below(0, cid, meta, payload, persist)
        return PutResult.STORED if stored else PutResult.EXISTED

    def _spill(self, cid: ChunkId, meta: ChunkMeta, payload, full: ResourceExhausted) -> PutResult:
        """A MEMORY put the first tier has no room for (its space is held by readers, writes
        in progress or pins): stored in the first lower tier that takes it, then on down by
        policy, as if it had been evicted from above. Counted in ``spilled``. Raises ``full``
        when no lower tier takes it."""
        for i in range(1, len(self.levels)):
            try:
                stored = self.levels[i].tier.put(cid, meta, payload)
            except (Unavailable, ResourceExhausted) as err:
                log.warning("%s has no room for %s and %s refused it too: %s", self.levels[0].medium.name,
                            cid.hex(), self.levels[i].medium.name, err)
                continue
            self._count("_spilled")
            if stored:
                self.write_below(i, cid, meta, payload, persist=False)
            return PutResult.STORED if stored else PutResult.EXISTED
        raise full

    def with_room(self, level: int, write: Callable[[], T]) -> T:
        """Runs a foreground ``write`` into ``level``; if that tier cannot make room
        (ResourceExhausted), the write-behind link out of it gives back the leases of its
        queued copies (skipped and counted) and ``write`` runs once more. Queued lower-tier
        copies therefore never make a put fail; a second ResourceExhausted is the tier's own
        (pins, readers, writes in progress) and propagates with its message."""
        try:
            return write()
        except QuotaExceeded:
            raise       # the tenant's own quota: other tenants' queued copies are not shed for it
        except ResourceExhausted:
            link = self._links[level] if level < len(self._links) else None
            if link is None or not link.shed():
                raise
        return write()

    def stored_in(self, level: int, cid: ChunkId, durability: Durability) -> None:
        """A chunk was just published in ``level`` by someone other than ``put`` (a same-host
        commit): sends it down the chain as ``put`` would for a MEMORY put. A PERSISTED
        chunk must have been written with ``write_below(..., persist=True)`` beforehand."""
        if durability == Durability.PERSISTED:
            return
        if level + 1 >= len(self.levels):
            return
        if self._links[level] is not None:
            self._links[level].submit(cid)
            return
        ref = self.levels[level].tier.peek(cid)
        if ref is not None:
            with ref:
                self.write_below(level, cid, ref.meta, ref.view, persist=False)

    def write_below(self, level: int, cid: ChunkId, meta: ChunkMeta, payload, persist: bool,
                    from_top: bool = False) -> bool:
        """Sends a chunk stored in ``level`` to the level below by that link's policy, and on
        down. ``persist``: synchronously through to the first durable level (Unavailable
        if that fails). Returns whether the next level stored it (False when queued)."""
        nxt = level + 1
        if nxt >= len(self.levels):
            return False
        if persist and from_top and self.levels[nxt].tier.contains(cid):
            # Already there (a re-put of a chunk only some tiers hold): go on to a durable one.
            if self.levels[nxt].durable:
                return False
            return self.write_below(nxt, cid, meta, payload, True, from_top=True)
        link = self._links[level]
        if link is not None and not persist:
            link.submit(cid)
            return False
        lower = self.levels[nxt]
        try:
            stored = lower.tier.put(cid, meta, payload)
        except (Unavailable, ResourceExhausted) as err:
            self._count("_write_errors")
            if persist:
                raise Unavailable(f"the chunk is in {self.levels[level].medium.name} but could not be persisted "
                                  f"to {lower.medium.name}: {err}") from err
            log.warning("write-through of %s to %s failed (the chunk stays above): %s", cid.hex(),
                        lower.medium.name, err)
            return False
        if stored or persist:
            self.write_below(nxt, cid, meta, payload, persist and not lower.durable, from_top)
        return stored

    def _write_behind(self, level: int, cid: ChunkId, ref: ChunkRef) -> None:
        """Writer thread of link ``level``: copies a leased chunk one level down, then on."""
        lower = self.levels[level + 1]
        try:
            stored = lower.tier.put(cid, ref.meta, ref.view)
        except KVStoreError as err:
            self._count("_write_errors")
            log.warning("write-behind of %s to %s failed (the chunk stays above): %s", cid.hex(),
                        lower.medium.name, err)
            return
        if stored:
            self.write_below(level + 1, cid, ref.meta, ref.view, persist=False)

    # -- reads ----------------------------------------------------------------------------------
    def get(self, cid: ChunkId) -> ChunkRef | None:
        """The first tier holding ``cid`` answers (file I/O: worker threads only). A read
        error in a tier is counted and the walk goes on; a hit below the top is promoted into
        the levels above that allow it when they can make room."""
        for i, lv in enumerate(self.levels):
            try:
                ref = lv.tier.get(cid)
            except Unavailable as err:
                self._count("_read_errors")
                log.warning("%s read of %s failed, trying further down: %s", lv.medium.name, cid.hex(), err)
                continue
            if ref is not None:
                if i:
                    self._promote(i, cid, ref)
                return ref
        return None

    def fill_prefix(self, cids: Sequence[ChunkId]) -> int:
        """Completes a prefix the levels hold only partly (worker threads): the leading run
        present locally stays, and the levels that ``serves_prefixes`` are asked, in order,
        for the rest in one batch each; what they return is promoted into the levels above
        them (as a hit found there would be). Returns the length of the leading run present
        in some level that ``lookup`` sees afterwards. A failing or slow source is a shorter
        run within its deadline, never an error."""
        have = len(self.lookup(cids))
        for i, lv in enumerate(self.levels):
            if have >= len(cids):
                break
            if not lv.tier.serves_prefixes:
                continue
            for f in lv.tier.fetch_prefix(cids[have:]):
                if not self._promote_fetched(i, f.cid, f.meta, f.payload):
                    return have  # no room above: the run ends here (later chunks stay remote)
                have += 1
        return have

    def _promote_fetched(self, found: int, cid: ChunkId, meta: ChunkMeta, payload) -> bool:
        """A chunk fetched from level ``found`` for a waiting reader: stored synchronously in
        the first level above that takes promotions, and sent further down as a put would
        be (a write-behind link queues it, so a disk write is not on the reader's path).
        Whether that first level holds it."""
        top = next((j for j in range(found) if self.levels[j].promote), None)
        if top is None:
            return False
        try:
            self.levels[top].tier.put(cid, meta, payload)
        except ResourceExhausted:
            self._count("_promotions_skipped")
            return False
        except Unavailable as err:
            self._count("_write_errors")
            log.warning("promotion of %s into %s failed: %s", cid.hex(), self.levels[top].medium.name, err)
            return False
        self.write_below(top, cid, meta, payload, persist=False)
        return True

    def _promote(self, found: int, cid: ChunkId, ref: ChunkRef) -> None:
        self._promote_copy(found, cid, ref.meta, ref.view)

    def _promote_copy(self, found: int, cid: ChunkId, meta: ChunkMeta, payload) -> bool:
        """Copies a chunk found in level ``found`` into the levels above that allow it;
        whether some level above now holds it."""
        held = False
        for lv in self.levels[:found]:
            if not lv.promote:
                continue
            try:
                lv.tier.put(cid, meta, payload)
                held = True
            except ResourceExhausted:
                self._count("_promotions_skipped")
            except Unavailable as err:
                self._count("_write_errors")
                log.warning("promotion of %s into %s failed: %s", cid.hex(), lv.medium.name, err)
        return held

    # -- removal --------------------------------------------------------------------------------
    def _cancel(self, match: Callable[[ChunkId], bool]) -> None:
        for link in self._links:
            if link is not None:
                link.cancel(match)

    def delete(self, cid: ChunkId) -> bool:
        """Removes the chunk from every tier (and its pin); queued copies are cancelled."""
        self._cancel(lambda c: c == cid)
        self.pins.unpin(cid)
        found = False
        for t in self._tiers():
            found = t.delete(cid) or found
        return found

    def delete_prefix(self, prefix: bytes) -> int:
        """Removes every chunk whose id starts with ``prefix`` (a namespace id clears a
        namespace) from every tier, the shared ones that ``serves_prefixes`` included (their
        ``delete_prefix``); returns how many distinct chunks were removed."""
        self._cancel(lambda c: c.startswith(prefix))
        self.pins.unpin_prefix(prefix)
        gone: set[ChunkId] = set()
        shared = 0
        for t in self._tiers():
            if t.serves_prefixes:
                # A shared store (the remote tier) is not scanned; it deletes by its own
                # index. Its count joins the local ones as a lower bound of the distinct ids.
                shared = max(shared, t.delete_prefix(prefix))
                continue
            for e in list(t.scan(prefix)):
                if t.delete(e.cid):
                    gone.add(e.cid)
        return max(len(gone), shared)

    def evict(self, cids: Sequence[ChunkId] | None = None, medium: Medium | None = None) -> int:
        """Explicit eviction from ``medium`` (or every medium) of ``cids`` (or, with None, of
        everything there). Pinned chunks are skipped (unpin them first). Evicting from an
        upper tier keeps its queued copies. Returns the number of (chunk, medium) copies removed."""
        n = 0
        for t in self._tiers(medium):
            ids = list(cids) if cids is not None else [e.cid for e in t.scan()]
            for cid in ids:
                if not self.pins.is_pinned(cid) and t.delete(cid):
                    n += 1
        return n

    # -- pins -----------------------------------------------------------------------------------
    def pin(self, cid: ChunkId, ttl_s: float = 0) -> bool:
        """Protects the chunk from eviction (``ttl_s`` 0: until unpinned); False if absent."""
        if self.medium_of(cid) is None:
            return False
        self.pins.pin(cid, ttl_s)
        return True

    def unpin(self, cid: ChunkId) -> bool:
        return self.pins.unpin(cid)

    # -- admin ----------------------------------------------------------------------------------
    def _info(self, cid: ChunkId, rows: list[EntryInfo]) -> KeyInfo:
        media = tuple(lv.medium for lv in self.levels if lv.tier.contains(cid))
        return KeyInfo(cid, rows[0].meta, media, self.pins.expiry(cid),
                       max(r.last_access_s for r in rows), sum(r.hits for r in rows))

    def entries(self, prefix: bytes = b"", medium: Medium | None = None, after: bytes = b"",
                limit: int = 100) -> list[KeyInfo]:
        """Chunks in id order, strictly after ``after`` (page with the last id returned)."""
        rows: dict[ChunkId, list[EntryInfo]] = {}
        for t in self._tiers(medium):
            for e in t.scan(prefix, after, limit):
                rows.setdefault(e.cid, []).append(e)
        return [self._info(c, rows[c]) for c in sorted(rows)[:limit]]

    def inspect(self, cid: ChunkId) -> KeyInfo | None:
        rows = [e for t in self._tiers() for e in t.scan(cid, limit=1) if e.cid == cid]
        return self._info(cid, rows) if rows else None

    def stats(self) -> ChainStats:
        with self._lock:
            werr, rerr, skipped, spilled = (self._write_errors, self._read_errors, self._promotions_skipped,
                                            self._spilled)
        links = [lk for lk in self._links if lk is not None]
        return ChainStats([t.stats() for t in self._tiers()], sum(lk.depth for lk in links),
                          sum(lk.dropped for lk in links), len(self.pins), werr, rerr, skipped, spilled)

    # -- lifecycle ------------------------------------------------------------------------------
    def flush(self, timeout_s: float | None = None) -> None:
        """Waits until every queued copy has been attempted, link by link from the top (a copy
        may queue the next one down); DeadlineExceeded on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for link in self._links:
            if link is not None:
                link.flush(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Drains every link (up to CLOSE_DRAIN_TIMEOUT_S each, then drops the rest), stops
        the writers and closes the tiers, slowest first. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for link in self._links:
            if link is not None:
                link.close(CLOSE_DRAIN_TIMEOUT_S)
        for lv in reversed(self.levels):
            lv.tier.close()

    def __enter__(self) -> "TierChain":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
