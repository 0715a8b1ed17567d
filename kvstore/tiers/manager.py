"""``TierManager``: DRAM in front of disk, write-behind to disk, promotion on disk hits, pins.

Who calls what, from which thread:

- the event-loop thread: ``lookup``, ``locate``, ``pin``, ``unpin``, ``entries``, ``inspect``,
  ``stats`` (in-memory only, never block on I/O);
- worker threads: ``put``, ``get``, ``delete``, ``delete_prefix``, ``evict``, ``flush``,
  ``close`` (may do file I/O or wait).

Write-behind: ``put`` stores in DRAM and, for MEMORY durability, queues a disk write holding a
DRAM lease taken at enqueue time (so eviction cannot pull the bytes away before the writer
copies them). The queue is bounded (``disk.write_queue_chunks``); when full the disk write is
dropped and counted (the chunk stays in DRAM). One writer thread drains it. PERSISTED puts
write to disk on the caller's thread and return once the chunk is synced.

The server never needs to know which medium answered: ``get`` returns a ``ChunkRef`` lease
(release it, or use ``with``). Same-host shared-memory reads go through ``dram`` (``locate``,
``lease``, ``arena_path``).
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .. import config as cfg
from ..errors import DeadlineExceeded, FailedPrecondition, KVStoreError, ResourceExhausted, Unavailable
from ..types import ChunkId, ChunkMeta, Durability, Encoding, Medium
from .base import ChunkRef, EntryInfo, PinTable, Tier, TierStats
from .disk import DiskTier
from .dram import DramTier
from .presence import PresenceIndex
from .transcode import NamespaceResolver, Transcoder

log = logging.getLogger(__name__)

#: How long ``close`` waits for queued disk writes before dropping them (seconds). Sized for a
#: full default queue (256 chunks of tens of MB) on a slow SSD.
CLOSE_DRAIN_TIMEOUT_S = 30.0
#: How long ``close`` waits for the writer thread to exit after the queue is settled (seconds).
WRITER_JOIN_TIMEOUT_S = 10.0


class PutResult(enum.Enum):
    STORED = "stored"
    EXISTED = "existed"


@dataclass(frozen=True)
class KeyInfo:
    cid: ChunkId
    meta: ChunkMeta
    #: Media holding the chunk, fastest first.
    media: tuple[Medium, ...]
    #: Pin expiry (unix s), 0.0 pinned without expiry, None not pinned.
    pin_expires_s: float | None
    last_access_s: float
    hits: int


@dataclass(frozen=True)
class ManagerStats:
    tiers: list[TierStats]
    write_queue_depth: int
    write_queue_dropped: int
    pinned_chunks: int
    #: Disk writes that failed (write-behind or PERSISTED); the chunk stayed in DRAM.
    write_errors: int = 0
    #: Disk reads that failed with an I/O error and were served as misses.
    read_errors: int = 0
    #: Disk hits that could not be promoted into DRAM (no room); served from disk anyway.
    promotions_skipped: int = 0


class _Write:
    """One queued disk write; ``cancelled`` is set by a delete before the writer reaches it."""

    __slots__ = ("cid", "ref", "cancelled")

    def __init__(self, cid: ChunkId, ref: ChunkRef) -> None:
        self.cid = cid
        self.ref = ref
        self.cancelled = False


class TierManager:
    """Composes the DRAM tier and (when ``config.disk.enabled``) the disk tier.

    ``disk_wrapper`` (tests, chaos runs) wraps the disk tier, e.g. in ``FaultyTier``.
    ``dram_verify_crc`` re-checks CRC32C on DRAM reads (debug aid).
    """

    def __init__(self, config: cfg.Config, clock: Callable[[], float] = time.time, *,
                 disk_wrapper: Callable[[Tier], Tier] | None = None, dram_verify_crc: bool = False) -> None:
        self._clock = clock
        self._dram_codec = config.dram.codec
        self._disk_codec = config.disk.codec
        self.transcoder: Transcoder | None = None
        self.pins = PinTable(clock)
        self.dram = DramTier(config.dram, self.pins, clock, verify_crc=dram_verify_crc)
        self.disk: Tier | None = None
        if config.disk.enabled:
            try:
                disk: Tier = DiskTier(config.disk, self.pins, clock)
            except BaseException:
                self.dram.close()
                raise
            self.disk = disk_wrapper(disk) if disk_wrapper is not None else disk
        self.presence: PresenceIndex | None = None
        if self.dram.arena_path is not None and config.dram.presence_buckets:
            try:
                self.presence = PresenceIndex(self.dram.arena_path.with_suffix(".index"),
                                              config.dram.presence_buckets, self.dram.nonce)
            except OSError as e:
                log.warning("no presence index (%s): same-host lookups will use the RPC", e)
        if self.presence is not None:
            # The real tiers (not a test wrapper around the disk) report their changes.
            for t in [self.dram] + ([disk] if self.disk is not None else []):
                t.listener = self.presence.changed
                for e in t.scan():
                    self.presence.changed(e.cid, t.medium, True)
        # Lock order: TierManager._lock -> tier locks -> PinTable._lock. ``_lock`` guards the
        # counters and ``_queued``; it is never held during I/O or while waiting on the queue.
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Write | None] = queue.Queue(maxsize=config.disk.write_queue_chunks)
        self._queued: dict[ChunkId, list[_Write]] = {}
        self._dropped = 0
        self._write_errors = 0
        self._read_errors = 0
        self._promotions_skipped = 0
        self._closed = False
        self._writer: threading.Thread | None = None
        if self.disk is not None:
            self._writer = threading.Thread(target=self._write_loop, name="kvstore-disk-writer", daemon=True)
            self._writer.start()

    def attach_namespaces(self, resolve: NamespaceResolver) -> None:
        """Lets the manager encode chunks (the codec needs their shape): the daemon passes
        the namespace registry's lookup. Without it only RAW tiers work."""
        self.transcoder = Transcoder(resolve)

    def _convert(self, cid: ChunkId, meta: ChunkMeta, payload, want: cfg.TierCodec):
        """``(meta, payload)`` in the encoding a tier stores (worker or writer thread)."""
        if want == cfg.TierCodec.RAW or meta.encoding == Encoding.CODEC:
            return meta, payload
        if self.transcoder is None:
            raise FailedPrecondition("a tier codec is configured but the manager has no namespace resolver "
                                     "(attach_namespaces); set the tier codecs to raw")
        return self.transcoder.convert(cid, meta, payload, want)

    def _tiers(self, medium: Medium | None = None) -> list[Tier]:
        tiers: list[Tier] = [self.dram] if self.disk is None else [self.dram, self.disk]
        return [t for t in tiers if medium is None or t.medium == medium]

    # -- lookups (non-blocking) ----------------------------------------------------------------
    def _medium_of(self, cid: ChunkId) -> Medium | None:
        if self.dram.contains(cid):
            return Medium.DRAM
        if self.disk is not None and self.disk.contains(cid):
            return Medium.DISK
        return None

    def lookup(self, cids: Sequence[ChunkId], pin_ttl_s: float = 0) -> list[Medium]:
        """Media of the leading run of present ids (stops at the first miss). With
        ``pin_ttl_s > 0`` the matched ids are pinned for at least that long, so the caller can
        fetch them before eviction takes them."""
        out: list[Medium] = []
        for cid in cids:
            m = self._medium_of(cid)
            if m is None:
                break
            out.append(m)
        if pin_ttl_s > 0:
            for cid in cids[:len(out)]:
                self.pins.extend(cid, pin_ttl_s)
        return out

    def locate(self, cids: Sequence[ChunkId]) -> list[Medium | None]:
        return [self._medium_of(c) for c in cids]

    # -- writes ---------------------------------------------------------------------------------
    def put(self, cid: ChunkId, meta: ChunkMeta, payload, durability: Durability) -> PutResult:
        """Stores the chunk (copying ``payload``). MEMORY: in DRAM, disk write queued.
        PERSISTED: also written and synced to disk before returning (Unavailable if the disk
        tier is disabled or fails). Raises ResourceExhausted when DRAM cannot make room and
        the chunk cannot go to disk instead."""
        if self._closed:
            raise FailedPrecondition("the tier manager is closed")
        persist = durability == Durability.PERSISTED
        if persist and self.disk is None:
            raise Unavailable("PERSISTED durability needs the disk tier; set disk.enabled = true "
                              "or store with MEMORY durability")
        if self._medium_of(cid) is not None:
            if persist and not self.disk.contains(cid):
                self._persist(cid, meta, payload)
            return PutResult.EXISTED
        dmeta, dpayload = self._convert(cid, meta, payload, self._dram_codec)
        try:
            stored = self.dram.put(cid, dmeta, dpayload)
        except ResourceExhausted:
            if not persist:
                raise
            return PutResult.STORED if self._persist(cid, meta, payload) else PutResult.EXISTED
        if persist:
            self._persist(cid, meta, payload)
        elif stored and self.disk is not None:
            self._enqueue(cid)
        return PutResult.STORED if stored else PutResult.EXISTED

    def _persist(self, cid: ChunkId, meta: ChunkMeta, payload) -> bool:
        try:
            return self.disk.put(cid, *self._convert(cid, meta, payload, self._disk_codec))
        except (Unavailable, ResourceExhausted) as err:
            with self._lock:
                self._write_errors += 1
            raise Unavailable(f"the chunk is in DRAM but could not be persisted: {err}") from err

    def _enqueue(self, cid: ChunkId) -> None:
        ref = self.dram.lease(cid)
        if ref is None:             # evicted already by a concurrent put: nothing left to copy
            with self._lock:
                self._dropped += 1
            return
        w = _Write(cid, ref)
        with self._lock:
            try:
                self._queue.put_nowait(w)
            except queue.Full:
                self._dropped += 1
                ref.release()
                return
            self._queued.setdefault(cid, []).append(w)

    def _write_loop(self) -> None:
        """The writer thread: copies queued chunks from their DRAM leases to disk."""
        while True:
            w = self._queue.get()
            try:
                if w is None:
                    return
                with self._lock:
                    pending = self._queued.get(w.cid, [])
                    if w in pending:
                        pending.remove(w)
                    if not pending:
                        self._queued.pop(w.cid, None)
                    cancelled = w.cancelled
                if not cancelled:
                    self._write_one(w)
            finally:
                if w is not None:
                    w.ref.release()
                self._queue.task_done()

    def _write_one(self, w: _Write) -> None:
        try:
            self.disk.put(w.cid, *self._convert(w.cid, w.ref.meta, w.ref.view, self._disk_codec))
        except KVStoreError as err:
            with self._lock:
                self._write_errors += 1
            log.warning("write-behind of %s to disk failed (chunk stays in DRAM): %s", w.cid.hex(), err)
        except Exception:  # noqa: BLE001 - the writer thread must outlive any one bad write
            with self._lock:
                self._write_errors += 1
            log.exception("write-behind of %s to disk failed with an unexpected error", w.cid.hex())

    def _cancel(self, match: Callable[[ChunkId], bool]) -> None:
        with self._lock:
            for cid, ws in self._queued.items():
                if match(cid):
                    for w in ws:
                        w.cancelled = True

    # -- reads ----------------------------------------------------------------------------------
    def get(self, cid: ChunkId) -> ChunkRef | None:
        """DRAM first, then disk (file I/O: worker threads only). A disk hit is promoted into
        DRAM when room can be made; the disk copy is returned either way."""
        ref = self.dram.get(cid)
        if ref is not None or self.disk is None:
            return ref
        try:
            ref = self.disk.get(cid)
        except Unavailable as err:
            with self._lock:
                self._read_errors += 1
            log.warning("disk read of %s failed, serving a miss: %s", cid.hex(), err)
            return None
        if ref is None:
            return None
        try:
            self.dram.put(cid, *self._convert(cid, ref.meta, ref.view, self._dram_codec))
        except ResourceExhausted:
            with self._lock:
                self._promotions_skipped += 1
        return ref

    # -- same-host path (LocalData service; worker threads) ---------------------------------------
    def lease_local(self, cid: ChunkId) -> tuple[ChunkRef, int, Medium] | None:
        """A DRAM lease on ``cid``, its arena offset, and the medium it was found in. A disk hit
        is promoted into DRAM first; None when absent or when DRAM cannot make room for it
        (the caller then serves it over the stream path)."""
        ref = self.get(cid)              # DRAM, else disk (promoted into DRAM when it can)
        if ref is None:
            return None
        found = ref.medium
        if found != Medium.DRAM:
            ref.release()
            ref = self.dram.lease(cid)
            if ref is None:
                return None
        return ref, self.dram.offset_of(ref), found

    def reserve_local(self, cid: ChunkId, nbytes: int):
        """Arena pages a local client fills directly (a ``dram.Reservation``), or None when
        ``cid`` is already stored in any tier."""
        if self._closed:
            raise FailedPrecondition("the tier manager is closed")
        if self._medium_of(cid) is not None:
            return None
        return self.dram.reserve(cid, nbytes)

    def commit_local(self, res, meta: ChunkMeta, durability: Durability) -> PutResult:
        """Publishes a filled reservation without copying it; then writes it to disk the way
        ``put`` does for ``durability``."""
        persist = durability == Durability.PERSISTED
        if persist and self.disk is None:
            self.dram.abort(res)
            raise Unavailable("PERSISTED durability needs the disk tier; set disk.enabled = true "
                              "or store with MEMORY durability")
        if persist:
            # From the reservation, which nothing can evict, before the chunk becomes visible.
            try:
                self._persist(res.cid, meta, res.view)
            except BaseException:
                self.dram.abort(res)
                raise
        if self._dram_codec != cfg.TierCodec.RAW and meta.encoding != Encoding.CODEC:
            # Local clients write RAW bytes; a compressed DRAM tier stores the encoded copy.
            try:
                cmeta, cpayload = self._convert(res.cid, meta, res.view, self._dram_codec)
            finally:
                self.dram.abort(res)
            self.dram.put(res.cid, cmeta, cpayload)
            if not persist and self.disk is not None:
                self._enqueue(res.cid)
            return PutResult.STORED
        self.dram.commit(res, meta)
        if not persist and self.disk is not None:
            self._enqueue(res.cid)
        return PutResult.STORED

    def abort_local(self, res) -> None:
        self.dram.abort(res)

    # -- removal --------------------------------------------------------------------------------
    def delete(self, cid: ChunkId) -> bool:
        """Removes the chunk from every tier (and its pin); a queued disk write is cancelled."""
        self._cancel(lambda c: c == cid)
        self.pins.unpin(cid)
        found = self.dram.delete(cid)
        if self.disk is not None:
            found = self.disk.delete(cid) or found
        return found

    def delete_prefix(self, prefix: bytes) -> int:
        """Removes every chunk whose id starts with ``prefix`` (a namespace id clears a
        namespace); returns how many distinct chunks were removed."""
        self._cancel(lambda c: c.startswith(prefix))
        self.pins.unpin_prefix(prefix)
        gone: set[ChunkId] = set()
        for t in self._tiers():
            for e in list(t.scan(prefix)):
                if t.delete(e.cid):
                    gone.add(e.cid)
        return len(gone)

    def evict(self, cids: Sequence[ChunkId] | None = None, medium: Medium | None = None) -> int:
        """Explicit eviction from ``medium`` (or every medium) of ``cids`` (or, with None, of
        everything there). Pinned chunks are skipped (unpin them first). Evicting from DRAM
        keeps a queued disk write. Returns the number of (chunk, medium) copies removed."""
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
        if self._medium_of(cid) is None:
            return False
        self.pins.pin(cid, ttl_s)
        return True

    def unpin(self, cid: ChunkId) -> bool:
        return self.pins.unpin(cid)

    # -- admin ----------------------------------------------------------------------------------
    def _info(self, cid: ChunkId, rows: list[EntryInfo]) -> KeyInfo:
        media = tuple(m for m, t in ((Medium.DRAM, self.dram), (Medium.DISK, self.disk))
                      if t is not None and t.contains(cid))
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

    def stats(self) -> ManagerStats:
        with self._lock:
            dropped, werr, rerr, skipped = (self._dropped, self._write_errors, self._read_errors,
                                            self._promotions_skipped)
        return ManagerStats([t.stats() for t in self._tiers()], self._queue.qsize(), dropped,
                            len(self.pins), werr, rerr, skipped)

    # -- lifecycle ------------------------------------------------------------------------------
    def flush(self, timeout_s: float | None = None) -> None:
        """Waits until every queued disk write has been attempted; DeadlineExceeded on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DeadlineExceeded(f"{self._queue.unfinished_tasks} disk writes still queued after "
                                           f"{timeout_s} s; the disk is slower than the write rate")
                self._queue.all_tasks_done.wait(left)

    def close(self) -> None:
        """Drains the write queue (up to CLOSE_DRAIN_TIMEOUT_S, then drops the rest, counted),
        stops the writer and closes the tiers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            try:
                self.flush(CLOSE_DRAIN_TIMEOUT_S)
            except DeadlineExceeded as err:
                log.error("closing with unwritten chunks: %s", err)
                self._cancel(lambda c: True)
            self._queue.put(None)
            self._writer.join(WRITER_JOIN_TIMEOUT_S)
            if self._writer.is_alive():
                log.error("disk writer did not stop within %s s; closing the tiers anyway",
                          WRITER_JOIN_TIMEOUT_S)
        if self.disk is not None:
            self.disk.close()
        self.dram.close()
        if self.presence is not None:
            self.presence.close()

    def __enter__(self) -> "TierManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
