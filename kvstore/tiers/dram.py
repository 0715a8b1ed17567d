"""The DRAM tier: chunk payloads live in one ``HostArena``; Python holds only small entries.

Callers: the ``TierChain`` and the store's same-host path from the event-loop thread (``contains``, ``locate``, ``scan``,
``stats``: never block on I/O) and from worker threads (``put``/``get``: a memcpy of the
payload, done outside the lock). Every method is thread-safe.

Lifetime of an extent: ``reserve`` takes pages (evicting by policy if needed) ->
the payload is copied into ``Reservation.view`` without the lock -> ``commit`` publishes the
chunk. ``get``/``lease`` hand out read leases (``ChunkRef``) that count on the entry; a
``delete`` or eviction of a leased entry only unlinks it (it disappears from lookups at once)
and its pages return to the allocator when the last lease is released. Eviction never picks a
leased, pinned or uncommitted chunk.

Tenant quotas (``account``, a ``quotas.TierAccount``): an extent is charged to its chunk's
tenant from ``reserve`` until its pages return to the allocator (``_free``: after delete,
eviction, abort or the last lease of an unlinked chunk), by extent bytes. A ``put`` charges
``quotas.max_dram_bytes`` at once; a same-host reservation (``reserve(..., same_host=True)``)
charges ``quotas.max_reserved_bytes`` until ``commit`` moves the charge to
``quotas.max_dram_bytes``. A tenant at its DRAM quota first evicts its OWN least valuable
unpinned, unleased chunks (never another tenant's: those are only evicted for want of arena
room, by policy); when that cannot make room the request fails with ResourceExhausted
naming the quota's key.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .. import config as cfg
from ..quotas import Resource, TierAccount
import kvstore_native as native
from ..errors import InvalidArgument, ResourceExhausted
from ..types import ChunkId, ChunkMeta, Medium
from .arena import HostArena, PageAllocator
from .base import ChunkRef, EntryInfo, PinTable, Tier, TierStats
from .policies import make_policy

log = logging.getLogger(__name__)


#: Pages the background clearer zeroes at a time (it holds them out of reach of writers only
#: while it zeroes them: a writer given one of them waits for that piece, not for the queue).
CLEAR_PIECE_BYTES = 4 * 1024 * 1024
#: Free runs a reservation looks at for a cleared window before it takes the best fit.
CLEAR_CANDIDATES = 8
#: How far into one free run a reservation looks for a cleared window (pages).
CLEAR_SCAN_PAGES = 1 << 16

#: Start of the arena's header page.
ARENA_MAGIC = b"kvstore-arena-1\0"
NONCE_OFFSET = len(ARENA_MAGIC)
NONCE_BYTES = 16


@dataclass(slots=True, eq=False)
class _Entry:
    cid: ChunkId
    meta: ChunkMeta | None      # None while reserved (being written)
    page: int                   # first page of the extent
    npages: int
    nbytes: int
    leases: int = 0
    dead: bool = False          # unlinked; pages freed when ``leases`` drops to 0
    last_access_s: float = 0.0
    hits: int = 0
    tenant: str | None = None   # charged to (None: nobody)
    charged: Resource | None = None   # what ``npages * page`` bytes are charged as


@dataclass(slots=True, eq=False)
class Reservation:
    """Pages taken for one chunk that is not yet visible: write the payload into ``view``
    (writable, exactly ``nbytes``) then ``DramTier.commit`` or ``DramTier.abort`` it.
    ``offset`` is the byte offset in the arena (a same-host client may write there)."""

    cid: ChunkId
    offset: int
    nbytes: int
    view: memoryview
    _entry: _Entry
    #: ``(start, length)`` byte ranges of ``view`` whose pages were handed out before (they
    #: may hold an older chunk's bytes); the rest has never been written since the arena was
    #: created (tmpfs pages start zeroed). Only these need clearing before a client sees them.
    stale: tuple[tuple[int, int], ...] = ()


class DramTier(Tier):
    """Host-memory tier over one arena. ``verify_crc`` (the default) checks a chunk's CRC32C
    on every ``get`` before anyone reads the lease: the arena is shared with same-host
    clients that may write into it, and a bit flipped in RAM must not be served. A chunk
    that fails is dropped, counted in ``stats().corrupt`` and reported as absent (the chain
    then reads the tier below). ``peek``/``lease`` do not check (write-behind copies: the
    lower tier checks the CRC on its own ``put``)."""

    medium = Medium.DRAM
    #: Where the arena header's nonce starts (``SharedMemoryTier.nonce_offset``).
    nonce_offset = NONCE_OFFSET

    def __init__(self, conf: cfg.DramConfig, pins: PinTable, clock: Callable[[], float],
                 verify_crc: bool = True, account: TierAccount | None = None) -> None:
        if conf.page_bytes <= 0 or conf.capacity_bytes < conf.page_bytes:
            raise InvalidArgument("dram.capacity_bytes must hold at least one dram.page_bytes page")
        self._page = conf.page_bytes
        self._arena = HostArena(conf.capacity_bytes // self._page * self._page, conf.shm_name)
        self._alloc = PageAllocator(self._arena.capacity_bytes // self._page)
        # Page 0 is the arena header: a magic string and a random nonce that local clients
        # compare to prove they mapped this daemon's memory (see LocalData.Attach).
        if self._alloc.alloc(1) != 0 or self._alloc.total_pages < 2:
            raise InvalidArgument("dram.capacity_bytes must hold at least two dram.page_bytes pages")
        # 1 per page that was ever handed out (it may hold bytes of a chunk since freed); a
        # fresh arena is all zeros, so its pages need no clearing before their first client.
        self._used = bytearray(self._alloc.total_pages)
        self._used[0] = 1
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        hdr = self._arena.writable(0, NONCE_OFFSET + NONCE_BYTES)
        hdr[:NONCE_OFFSET] = ARENA_MAGIC
        hdr[NONCE_OFFSET:] = self.nonce
        hdr.release()
        self._policy = make_policy(conf.policy, self._arena.capacity_bytes - self._page)
        self._pins = pins
        self._clock = clock
        self._verify = verify_crc
        self._account = account
        # Lock order: TierChain/WriteBehind locks -> DramTier._lock -> PinTable._lock. Never held during
        # a payload copy or a checksum.
        self._lock = threading.Lock()
        self._entries: dict[ChunkId, _Entry] = {}          # committed and reserved, not dead
        self._stats = TierStats(Medium.DRAM, self._policy.name, self._arena.capacity_bytes - self._page)
        self._closed = False
        # Background clearing (``dram.clear_freed``): freed runs wait in ``_dirty`` until the
        # clearer thread zeroes them and marks their pages unused again, so a same-host writer
        # is handed cleared pages and its ReserveWrite skips the zeroing pass. ``_clearing`` is
        # the piece being zeroed right now (without the lock); a reservation that takes any of
        # its pages waits on ``_cleared`` for that piece to finish.
        self._dirty: deque[tuple[int, int]] = deque()
        self._clearing: tuple[int, int] | None = None
        self._cleared = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._free_target_pages = -(-conf.free_target_bytes // self._page) if conf.clear_freed else 0
        #: Bytes the clearer zeroed, and chunks it evicted to keep ``dram.free_target_bytes`` free.
        self.cleared_bytes = 0
        self.cleared_evictions = 0
        self._clearer: threading.Thread | None = None
        if conf.clear_freed:
            self._clearer = threading.Thread(target=self._clear_loop, name="kvstore-dram-clear", daemon=True)
            self._clearer.start()

    # -- shared-memory view ------------------------------------------------------------------
    @property
    def arena_path(self):
        """``/dev/shm`` file clients map, or None for an anonymous arena."""
        return self._arena.path

    @property
    def arena_bytes(self) -> int:
        return self._arena.capacity_bytes

    def locate(self, cid: ChunkId) -> tuple[int, int] | None:
        """(arena offset, payload bytes) of a committed chunk, or None. Informational only: the
        extent may be reused as soon as this returns; hold a ``lease`` while anyone reads it."""
        with self._lock:
            e = self._entries.get(cid)
            return None if e is None or e.meta is None else (e.page * self._page, e.nbytes)

    def offset_of(self, ref: ChunkRef) -> int:
        """Arena offset of a DRAM lease's bytes (what a local client reads at)."""
        base = np.frombuffer(self._arena.buf, dtype=np.uint8).ctypes.data
        return np.frombuffer(ref.view, dtype=np.uint8).ctypes.data - base

    def lease(self, cid: ChunkId) -> ChunkRef | None:
        """A read lease like ``get`` but without counting a hit or touching recency (used for
        write-behind copies and for shared-memory reads; ``locate`` gives the offset)."""
        return self._lease(cid, touch=False)

    def peek(self, cid: ChunkId) -> ChunkRef | None:
        return self._lease(cid, touch=False)

    def shared_memory(self) -> "DramTier | None":
        """This tier when its arena is a shared-memory file, else None (a private arena)."""
        return self if self._arena.path is not None else None

    # -- Tier primitives --------------------------------------------------------------------
    def get(self, cid: ChunkId) -> ChunkRef | None:
        """A verified lease (see the class docstring), or None: absent, or dropped as corrupt.
        The checksum runs on the caller's thread, outside the lock, with the GIL released."""
        ref = self._lease(cid, touch=True)
        if ref is None or not self._verify:
            return ref
        meta = ref.meta
        crc = native.crc32c(ref.view)
        if crc == meta.crc32c:
            return ref
        ref.release()
        log.error("DRAM chunk %s failed its CRC32C check (%#010x, stored with %#010x): the arena was written "
                  "outside a reservation or the memory is failing; dropping the copy, lower tiers serve it",
                  cid.hex(), crc, meta.crc32c)
        with self._lock:
            self._stats.corrupt += 1
            self._stats.hits -= 1     # counted as a hit by _lease; it is served as a miss
            self._stats.misses += 1
            e = self._entries.get(cid)
            if e is not None and e.meta is meta:   # not a good copy stored again meanwhile
                self._unlink(e, evicted=False)
        return None

    def get_unverified(self, cid: ChunkId) -> ChunkRef | None:
        """``get`` without the CRC32C check, for a same-host reader that checks the bytes it
        copies out itself (``LeaseReadRequest.client_verifies``); a hit is counted, a miss is
        not (the caller then reads through the chain, which counts it)."""
        return self._lease(cid, touch=True, count_miss=False)

    def _lease(self, cid: ChunkId, touch: bool, count_miss: bool = True) -> ChunkRef | None:
        with self._lock:
            e = self._entries.get(cid)
            if e is None or e.meta is None:
                if touch and count_miss:
                    self._stats.misses += 1
                return None
            e.leases += 1
            if touch:
                e.hits += 1
                e.last_access_s = self._clock()
                self._stats.hits += 1
                self._policy.touch(cid)
            view = self._arena.readonly(e.page * self._page, e.nbytes)
        return ChunkRef(cid, e.meta, view, Medium.DRAM, lambda: self._release(e))

    def _release(self, e: _Entry) -> None:
        with self._lock:
            e.leases -= 1
            assert e.leases >= 0, "lease released twice"
            if e.leases == 0 and e.dead:
                self._free(e)

    def _free(self, e: _Entry) -> None:
        self._alloc.free(e.page, e.npages)
        self._stats.used_bytes -= e.npages * self._page
        if self._clearer is not None:
            self._dirty.append((e.page, e.npages))
            self._wake.set()
        if e.charged is not None:
            self._account.release(e.tenant, e.npages * self._page, e.charged)
            e.charged = None

    def put(self, cid: ChunkId, meta: ChunkMeta, payload: memoryview | bytes) -> bool:
        n = memoryview(payload).nbytes
        if n != meta.payload_bytes:
            raise InvalidArgument(f"payload has {n} bytes but its metadata says {meta.payload_bytes}")
        res = self.reserve(cid, n)
        if res is None:
            return False
        try:
            native.copy_into(res.view, payload)
        except BaseException:
            self.abort(res)
            raise
        self.commit(res, meta)
        return True

    def reserve(self, cid: ChunkId, nbytes: int, same_host: bool = False) -> Reservation | None:
        """Takes pages for ``cid`` (evicting by policy); None if ``cid`` is already present
        OR is being written right now (reserved, not yet committed: "in flight"). Never waits
        for that other writer: a reservation may be held by a same-host client for up to
        ``server.lease_ttl_s``, and a waiting worker thread would stall every other tenant's
        requests behind it. The caller reports such a chunk as existing (pending); if that
        writer aborts, the chunk is simply absent (a cache miss), never wrong.
        ``same_host``: the pages are charged as the tenant's reserved bytes until ``commit``
        (else as its DRAM bytes). Raises ResourceExhausted when no room can be made or the
        chunk's tenant is over its quota (see the module docstring)."""
        npages = max(1, -(-nbytes // self._page))
        tenant = self._account.tenant(cid) if self._account is not None else None
        charge = Resource.RESERVED_BYTES if same_host else Resource.DRAM_BYTES
        with self._lock:
            if cid in self._entries:   # committed, or in flight
                return None
            if npages > self._alloc.total_pages - 1:  # page 0 is the header
                raise ResourceExhausted(
                    f"a chunk of {nbytes} bytes does not fit the DRAM arena of {self._arena.capacity_bytes} "
                    "bytes; raise dram.capacity_bytes or store smaller chunks")
            if tenant is not None:
                self._charge_locked(tenant, npages * self._page, charge)
            try:
                page = self._alloc_locked(npages)
                if page is None:
                    page = self._make_room(npages)
            except BaseException:
                if tenant is not None:
                    self._account.release(tenant, npages * self._page, charge)
                raise
            e = _Entry(cid, None, page, npages, nbytes, last_access_s=self._clock(), tenant=tenant,
                       charged=charge if tenant is not None else None)
            self._entries[cid] = e
            self._stats.used_bytes += npages * self._page
            while self._being_cleared(page, npages):
                self._cleared.wait()          # that piece's pages are being zeroed right now
            stale = self._stale_locked(page, npages, nbytes)
            if self._free_target_pages and self._alloc.free_pages < self._free_target_pages:
                self._wake.set()
        off = page * self._page
        return Reservation(cid, off, nbytes, self._arena.writable(off, nbytes), e, stale)

    def _alloc_locked(self, npages: int) -> int | None:
        """A free run of ``npages``: the first cleared window (pages unused since they were
        last zeroed) among the best-fitting free runs and the largest, else the best fit.
        Caller holds the lock."""
        if self._clearer is not None:
            want = bytes(npages)
            used = self._used
            for length, start in self._alloc.candidates(npages, CLEAR_CANDIDATES):
                i = used.find(want, start, start + min(length, npages + CLEAR_SCAN_PAGES))
                if i != -1:
                    return self._alloc.alloc_within(start, i, npages)
        return self._alloc.alloc(npages)

    def _being_cleared(self, page: int, npages: int) -> bool:
        """Whether the clearer is zeroing any of ``npages`` pages from ``page`` right now."""
        c = self._clearing
        return c is not None and page < c[1] and c[0] < page + npages

    def _next_dirty_locked(self) -> tuple[int, int] | None:
        """The next piece ``(lo, hi)`` of free pages that may hold old bytes, or None. Runs
        taken by a writer since they were freed are skipped (their writer clears its own)."""
        piece = max(1, CLEAR_PIECE_BYTES // self._page)
        used = self._used
        while self._dirty:
            page, npages = self._dirty.popleft()
            for lo, hi in self._alloc.free_runs_in(page, page + npages):
                first = used.find(1, lo, hi)
                if first == -1:
                    continue
                end = min(hi, first + piece)
                if end < page + npages:
                    self._dirty.appendleft((end, page + npages - end))
                return first, end
        return None

    def _clear_loop(self) -> None:
        """The clearer thread: evicts ahead to keep ``dram.free_target_bytes`` free, then
        zeroes freed pages piece by piece (non-temporal stores, the lock not held) and marks
        them unused again."""
        while True:
            self._wake.wait()
            with self._lock:
                if self._closed:
                    return
                if self._free_target_pages and self._alloc.free_pages < self._free_target_pages:
                    self.cleared_evictions += len(self._evict_locked(self._free_target_pages * self._page))
                got = self._next_dirty_locked()
                if got is None:
                    self._wake.clear()      # under the lock: a later free sets it again
                    continue
                self._clearing = got
            lo, hi = got
            try:
                view = self._arena.writable(lo * self._page, (hi - lo) * self._page)
                native.zero(view)
                view.release()
                zeroed = True
            except BaseException:  # noqa: BLE001 - the pages stay marked as used: writers zero them
                log.exception("clearing freed DRAM pages failed")
                zeroed = False
            with self._lock:
                if zeroed:
                    self._used[lo:hi] = bytes(hi - lo)
                    self.cleared_bytes += (hi - lo) * self._page
                self._clearing = None
                self._cleared.notify_all()

    def _stale_locked(self, page: int, npages: int, nbytes: int) -> tuple[tuple[int, int], ...]:
        """Byte ranges (of an extent of ``nbytes`` at ``page``) on pages handed out before,
        then marks all ``npages`` as handed out. Caller holds the lock."""
        used = self._used
        seg = bytes(used[page:page + npages])
        used[page:page + npages] = b"\x01" * npages
        if seg.count(1) == 0:
            return ()
        if seg.count(0) == 0:
            return ((0, nbytes),)
        out = []
        i = seg.find(1)
        while i != -1 and i * self._page < nbytes:
            j = seg.find(0, i)
            j = npages if j == -1 else j
            start = i * self._page
            out.append((start, min(j * self._page, nbytes) - start))
            i = seg.find(1, j)
        return tuple(out)

    def commit(self, res: Reservation, meta: ChunkMeta) -> None:
        """Publishes a reserved chunk; ``meta.payload_bytes`` must equal the reserved size.
        A same-host reservation's charge moves from reserved to DRAM bytes here:
        ResourceExhausted (the reservation stays, unpublished: abort it) when the tenant's
        DRAM quota cannot take it even after evicting the tenant's own chunks."""
        if meta.payload_bytes != res.nbytes:
            raise InvalidArgument(f"metadata says {meta.payload_bytes} bytes, {res.nbytes} were reserved")
        with self._lock:
            e = res._entry
            if e.charged is Resource.RESERVED_BYTES:
                n = e.npages * self._page
                self._charge_locked(e.tenant, n, Resource.DRAM_BYTES)
                self._account.release(e.tenant, n, Resource.RESERVED_BYTES)
                e.charged = Resource.DRAM_BYTES
        res.view.release()
        with self._lock:
            e.meta = meta
            self._policy.insert(e.cid, e.npages * self._page)
            self._stats.chunks += 1
            self._notify(e.cid, True)

    def rebind(self, res: Reservation, cid: ChunkId) -> bool:
        """Moves an uncommitted reservation (taken under a placeholder id: an unbound
        same-host extent) to ``cid``, in place; False, leaving it as it was, when ``cid`` is
        present or being written already (the caller aborts it). Both ids must belong to one
        namespace (the tenant charged for the pages stays the same)."""
        with self._lock:
            e = res._entry
            if cid in self._entries or self._entries.get(e.cid) is not e or e.meta is not None:
                return False
            del self._entries[e.cid]
            e.cid = cid
            self._entries[cid] = e
        res.cid = cid
        return True

    def abort(self, res: Reservation) -> None:
        """Gives back the pages of a reservation that will not be committed."""
        res.view.release()
        with self._lock:
            e = res._entry
            del self._entries[e.cid]
            self._free(e)

    def _charge_locked(self, tenant: str, nbytes: int, resource: Resource) -> None:
        """Charges ``nbytes`` of ``resource`` to ``tenant``, first evicting the tenant's own
        chunks by policy while it is over its DRAM quota (reserved bytes are never made room
        for: they are bounded, not cached). ResourceExhausted naming the quota's key when the
        quota still cannot take them. Caller holds the lock. O(chunks) only when over quota;
        the tenant's chunks go least recently used first (the shared policy is not walked, so
        other tenants' recency and frequency state is untouched)."""
        if resource is Resource.DRAM_BYTES and self._account.excess(tenant, nbytes, resource) > 0:
            own = sorted((e for e in self._entries.values()
                          if e.tenant == tenant and e.meta is not None and not e.leases
                          and not self._pins.is_pinned(e.cid)), key=lambda e: e.last_access_s)
            for e in own:
                self._unlink(e, evicted=True)
                if self._account.excess(tenant, nbytes, resource) <= 0:
                    break
        self._account.charge(tenant, nbytes, resource)

    def _make_room(self, npages: int) -> int:
        """Evicts by policy until a run of ``npages`` is free; returns its start. Caller holds
        the lock."""
        for cid in self._policy.victims():
            e = self._entries[cid]
            if e.leases or self._pins.is_pinned(cid):
                continue
            self._unlink(e, evicted=True)
            page = self._alloc.alloc(npages)
            if page is not None:
                return page
        raise ResourceExhausted(self._no_room_message(npages * self._page))

    def _no_room_message(self, nbytes: int) -> str:
        """What holds the arena when ``nbytes`` cannot be freed, and the knob to turn. Caller
        holds the lock (the failure path only: it walks every entry)."""
        reserved = leased = pinned = 0
        n_res = n_lease = n_pin = 0
        live = 0
        for e in self._entries.values():
            b = e.npages * self._page
            live += b
            if e.meta is None:
                reserved, n_res = reserved + b, n_res + 1
            elif e.leases:
                leased, n_lease = leased + b, n_lease + 1
            elif self._pins.is_pinned(e.cid):
                pinned, n_pin = pinned + b, n_pin + 1
        dead = self._stats.used_bytes - live          # unlinked, waiting for their last lease
        free = self._alloc.free_pages * self._page
        mib = 1024 * 1024
        return (f"DRAM arena full: no room for a {nbytes / mib:.1f} MiB chunk in dram.capacity_bytes = "
                f"{self._stats.capacity_bytes / mib:.0f} MiB. Held: {reserved / mib:.1f} MiB by {n_res} writes in "
                f"progress, {(leased + dead) / mib:.1f} MiB by {n_lease} read leases (streams, same-host reads, a "
                f"copy to a lower tier in progress) and deleted chunks still being read, {pinned / mib:.1f} MiB by {n_pin} pinned chunks; "
                f"{free / mib:.1f} MiB free (too little, or not contiguous). Raise dram.capacity_bytes, write from fewer clients "
                "at once, or unpin chunks (kvctl unpin)")

    def _unlink(self, e: _Entry, evicted: bool) -> None:
        del self._entries[e.cid]
        self._notify(e.cid, False)
        self._policy.remove(e.cid, evicted=evicted)
        self._stats.chunks -= 1
        if evicted:
            self._stats.evictions += 1
        if e.leases:
            e.dead = True
        else:
            self._free(e)

    def contains(self, cid: ChunkId) -> bool:
        with self._lock:
            e = self._entries.get(cid)
            return e is not None and e.meta is not None

    def delete(self, cid: ChunkId) -> bool:
        with self._lock:
            e = self._entries.get(cid)
            if e is None or e.meta is None:
                return False
            self._unlink(e, evicted=False)
            return True

    def evict(self, nbytes: int) -> list[ChunkId]:
        with self._lock:
            return self._evict_locked(nbytes)

    def _evict_locked(self, nbytes: int) -> list[ChunkId]:
        """Evicts by policy (never a leased or pinned chunk) until ``nbytes`` are free;
        returns the evicted ids. Caller holds the lock."""
        out: list[ChunkId] = []
        for cid in self._policy.victims():
            if self._alloc.free_pages * self._page >= nbytes:
                break
            e = self._entries[cid]
            if e.leases or self._pins.is_pinned(cid):
                continue
            self._unlink(e, evicted=True)
            out.append(cid)
        return out

    def scan(self, prefix: bytes = b"", after: bytes = b"", limit: int = 0) -> Iterator[EntryInfo]:
        with self._lock:
            rows = [EntryInfo(e.cid, e.meta, e.last_access_s, e.hits) for e in self._entries.values()
                    if e.meta is not None and e.cid.startswith(prefix) and e.cid > after]
        rows.sort(key=lambda r: r.cid)
        return iter(rows[:limit] if limit else rows)

    def stats(self) -> TierStats:
        with self._lock:
            s = TierStats(**{f: getattr(self._stats, f) for f in TierStats.__slots__})
            ids = list(self._entries)
        s.pinned_chunks = sum(1 for c in ids if self._pins.is_pinned(c))
        return s

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._entries.clear()
            while self._clearing is not None:   # the clearer's piece is written before the unmap
                self._cleared.wait()
        self._wake.set()
        if self._clearer is not None:
            self._clearer.join()
        self._arena.close()
