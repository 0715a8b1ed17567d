"""``LocalAccess``: the same-host operations of the store, over ``SharedMemoryTier``.

A local client maps the arena of the chain's shared-memory level (``attach``), reads chunks
through leases on it (``lease_run``) and writes chunks into reservations it fills itself
(``reserve`` -> ``commit``/``abort``). Leases and reservations are the shared tier's; the
server's ``LeaseTable`` only keeps them until the client releases them or they expire.

No stale bytes: the pages of an extent handed to a client that held anything before are
zeroed first (freed pages hold other tenants' deleted or evicted chunks; pages never handed
out since the arena was created are zeros already), and ``commit_many`` publishes an extent
only when the client's CRC32C of what it wrote matches the extent, unless the client asks
for its checksums to be taken unread (``skip_verify``: readers verify; docs/security.md,
"Stale bytes"). A reader that checks what it copies itself (``client_verifies``) gets leases
on arena chunks without the daemon's CPU check; one that read chunks without any lease
reports them with ``touch`` so they count as hits and stay recent.

Threading: ``attach`` and ``nonce`` are non-blocking; the rest runs on worker threads (a
chain read may hit the disk, ``reserve`` may evict and zeroes the extent; nothing here waits
for another writer).
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import kvstore_native as native

from ..chain import TierChain
from ..domain.errors import DataLoss, FailedPrecondition, InvalidArgument
from ..domain.results import PutResult
from ..domain.types import ChunkId, ChunkMeta, Durability, Medium
from ..tiers.base import ChunkRef
from ..tiers.shared import Reservation, SharedMemoryTier
from .crc_parallel import PieceCrc

#: Threads that checksum and zero same-host extents: one per core up to this many (a 16-core
#: GPU host verifies a 537 MB commit of 16 Llama-3-8B chunks on all of them).
MAX_MEMORY_THREADS = 16
#: Extents are checksummed and zeroed in pieces of this size, in parallel.
PIECE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ArenaInfo:
    path: Path
    nbytes: int
    nonce: bytes
    nonce_offset: int
    #: The presence index file, or None when there is none.
    index_path: Path | None


@dataclass(frozen=True)
class LocalRead:
    """A lease on a chunk in the shared arena, where it starts, and where it was found."""

    ref: ChunkRef
    offset: int
    found_in: Medium


class LocalAccess:
    def __init__(self, chain: TierChain, index_path: Path | None, crc_threads: int) -> None:
        self._chain = chain
        # Separate from the caller's worker pool: ``commit_many``, ``lease_run`` and ``reserve``
        # run on a worker and wait for these (checksums, zeroing: one pass over memory per core).
        self._crc_pool = ThreadPoolExecutor(max(crc_threads, min(os.cpu_count() or 1, MAX_MEMORY_THREADS)),
                                            thread_name_prefix="kvstore-crc")
        self._piece_crc = PieceCrc(PIECE_BYTES)
        self._level = chain.shared_level
        self._shared_tier: SharedMemoryTier | None = (
            None if self._level is None else chain.levels[self._level].tier.shared_memory())
        self._index_path = index_path
        # One ReserveWrite's clearing at a time, on every memory thread: requests are served
        # in arrival order, so a client's first (small) reservation is ready first and its
        # copies overlap the clearing of the next, instead of every request finishing last.
        self._zero_lock = threading.Lock()
        self._unbound = itertools.count(1)   # placeholder ids of unbound reservations
        #: The HBM tier's pool (``tiers.hbm.HbmTier.device_pool()``), or None without one.
        self._device = next((lv.tier.device_pool() for lv in chain.levels if lv.tier.device_pool() is not None),
                            None)

    def _shared(self) -> SharedMemoryTier:
        if self._shared_tier is None:
            raise FailedPrecondition("this daemon's DRAM arena is private (dram.shm_name is empty, or /dev/shm had "
                                     "no room); use the KVStore stream path, or set dram.shm_name = 'auto'")
        return self._shared_tier

    def attach(self) -> ArenaInfo:
        s = self._shared()
        return ArenaInfo(s.arena_path, s.arena_bytes, s.nonce, s.nonce_offset, self._index_path)

    @property
    def arena_path(self):
        """The shared arena's file, or None when the arena is private (for the start-up banner)."""
        return None if self._shared_tier is None else self._shared_tier.arena_path

    @property
    def nonce(self) -> bytes:
        return self._shared().nonce

    def lease_run(self, cids: Sequence[ChunkId], client_verifies: bool = False) -> list[LocalRead | None]:
        """Leases of the leading run of present chunks (a prefix ends at the first miss, so
        nothing after it is leased); a chunk found below the arena is promoted into it first.
        A chunk the arena cannot make room for ends the run (the client reads it over the
        stream path), and so does one whose arena copy fails its CRC32C check and has no
        copy below. Every lease is of a chunk whose CRC32C the shared tier has just checked
        (``Tier.get``); the checks of one run go in parallel on the CRC pool. With a level that
        serves prefixes (the remote tier), what the local tiers miss is fetched from it in one
        batch and promoted first. ``client_verifies``: the reader checks every extent's
        CRC32C over what it copies (and asks again without it for one that fails), so a
        chunk already in the arena is leased without the shared tier's CPU check."""
        s = self._shared()
        if self._chain.serves_prefixes:
            self._chain.fill_prefix(cids)   # the part missed locally, from the remote tier in one batch
        run = self._chain.lookup(cids)      # in-memory presence: only the leading run is leased
        leading = cids[:len(run)]
        if client_verifies and all(s.contains(c) for c in leading):
            # Nothing to check and nothing to promote: leased here, without a hop per chunk.
            results = [functools.partial(self._lease, s, c, True) for c in leading]
        else:
            results = [self._crc_pool.submit(self._lease, s, c, client_verifies).result for c in leading]
        got: list[LocalRead | None] = []
        failure: BaseException | None = None
        for result in results:
            try:
                got.append(result())
            except BaseException as err:  # noqa: BLE001 - re-raised below once every lease is released
                failure = failure or err
                got.append(None)
        if failure is not None:
            for lr in got:
                if lr is not None:
                    lr.ref.release()
            raise failure
        out: list[LocalRead | None] = []
        for i, lr in enumerate(got):
            if lr is None:                  # evicted or dropped meanwhile: the run ends here
                for later in got[i + 1:]:
                    if later is not None:
                        later.ref.release()
                break
            out.append(lr)
        return out + [None] * (len(cids) - len(out))

    def touch(self, cids: Sequence[ChunkId]) -> list[bool]:
        """Counts the chunks a same-host reader copied without a lease (``touch_only``) as
        hits and refreshes their recency, as a lease would; which of them the arena holds.
        Nothing is leased, read or promoted, so this never blocks on a lower tier."""
        s = self._shared()
        found = []
        for cid in cids:
            if self._device is not None and self._device.touch(cid):   # read from the HBM pool
                found.append(True)
                continue
            ref = s.get_unverified(cid)   # a hit, recency touched; the lease ends at once
            if ref is not None:
                ref.release()
            found.append(ref is not None)
        return found

    def _lease(self, s: SharedMemoryTier, cid: ChunkId, client_verifies: bool = False) -> LocalRead | None:
        if client_verifies:   # in the arena already: the reader checks the bytes it copies
            ref = s.get_unverified(cid)
            if ref is not None:
                return LocalRead(ref, s.offset_of(ref), ref.medium)
        if self._level:   # a level above the arena (HBM): the arena's own copy, without a device round trip
            ref = self._chain.levels[self._level].tier.get(cid)
            if ref is not None:
                return LocalRead(ref, s.offset_of(ref), ref.medium)
        ref = self._chain.get(cid)      # the first tier holding it; promoted upward when it can be
        if ref is None:
            return None
        found = ref.medium
        if found != self._chain.levels[self._level].medium:
            ref.release()
            ref = s.lease(cid)
            if ref is None:
                return None
        return LocalRead(ref, s.offset_of(ref), found)

    # ---- the HBM tier's pool (same-host GPU clients)
    def device_export(self):
        """``tiers.hbm.PoolExport`` of the HBM pool (what Attach hands out), or None without one."""
        return None if self._device is None else self._device.export()

    @property
    def device_nonce(self) -> bytes:
        return b"" if self._device is None else self._device.nonce

    def device_lease_run(self, cids: Sequence[ChunkId]) -> list:
        """``DeviceLease``s of the leading run of ``cids`` held in the HBM pool (empty without
        one). A chunk found below the pool is read through the chain first, which promotes
        it into the pool when ``chain.promote_on_hit`` allows and the pool has room; the run
        ends at the first chunk the pool then still lacks. Worker threads (a promotion copies
        to the GPU; a disk hit reads a file)."""
        out: list = []
        if self._device is None:
            return out
        try:
            for cid in cids:
                got = self._device.lease(cid)
                if got is None:
                    ref = self._chain.get(cid)   # a hit below is promoted into the pool by chain policy
                    if ref is None:
                        break
                    ref.release()
                    got = self._device.lease(cid)
                    if got is None:
                        break
                out.append(got)
        except BaseException:
            for d in out:
                d.release()
            raise
        return out

    def reserve(self, cid: ChunkId, nbytes: int) -> Reservation | None:
        """Arena pages a local client fills directly, zeroed where they held anything before
        (another tenant's freed chunk), or None when ``cid`` is already stored in any tier or
        being written by another request right now (never waits for it)."""
        return self.reserve_many([(cid, nbytes)])[0]

    def reserve_many(self, wanted: Sequence[tuple[ChunkId, int]]) -> list[Reservation | None]:
        """``reserve`` for each ``(cid, nbytes)`` in one call: pages taken in order, then the
        stale ranges of every extent (``Reservation.stale``: pages handed out before) zeroed
        at once in pieces on the memory threads, with non-temporal stores (one worker hop and
        one write pass per core for a whole ReserveWrite; none for pages never used since the
        arena was created). On failure nothing stays reserved."""
        s = self._shared()
        self._chain.check_put(Durability.MEMORY)
        out: list[Reservation | None] = []
        try:
            for cid, nbytes in wanted:
                if self._chain.medium_of(cid) is not None:
                    out.append(None)
                    continue
                out.append(self._chain.with_room(self._level, lambda: s.reserve(cid, nbytes, same_host=True)))
            # never hand out another chunk's old bytes (docs/security.md)
            pieces = [r.view[i:min(i + PIECE_BYTES, start + length)] for r in out if r is not None
                      for start, length in r.stale for i in range(start, start + length, PIECE_BYTES)]
            if pieces:
                with self._zero_lock:
                    for f in [self._crc_pool.submit(native.zero, p) for p in pieces]:
                        f.result()
        except BaseException:
            for r in out:
                if r is not None:
                    s.abort(r)
            raise
        return out

    def commit(self, res: Reservation, meta: ChunkMeta, durability: Durability) -> PutResult:
        """Publishes a filled reservation without copying it, then sends it down the chain as
        ``put`` does for ``durability`` (PERSISTED: written to the durable tier from the
        reservation, which nothing can evict, before the chunk becomes visible)."""
        s = self._shared()
        try:
            persist = self._chain.check_put(durability)
            if persist:
                self._chain.write_below(self._level, res.cid, meta, res.view, persist=True)
            s.commit(res, meta)     # over the tenant's DRAM quota: ResourceExhausted, aborted below
        except BaseException:
            s.abort(res)
            raise
        self._chain.stored_in(self._level, res.cid, durability)
        return PutResult.STORED

    def commit_many(self, reservations: list[tuple[int, Reservation, ChunkMeta]], crcs: Sequence[int],
                    durability: Durability, trust_crcs: bool = False) -> tuple[int, int]:
        """Verifies each filled ``(slot index, reservation, meta)`` against ``crcs`` (exactly
        one per reservation, in order: the CRC32C the client computed over what it wrote),
        then commits it. Entries are popped from ``reservations`` as they are handled, so
        whatever happens the caller aborts only the rest. InvalidArgument (nothing committed)
        when the checksums are missing or miscounted; a chunk whose extent does not match is
        aborted and reported (DataLoss) after the good ones are stored. ``trust_crcs`` (a
        principal with ``trust_client_crc``): the extents are published with ``crcs`` unread.
        Returns ``(stored, existed)``."""
        if len(crcs) != len(reservations):
            what = "no CRC32C checksums" if not crcs else f"{len(crcs)} CRC32C checksums"
            raise InvalidArgument(
                f"CommitWrite carried {what} for {len(reservations)} reserved slots: send crc32c, one per slot "
                "that was not `exists`, in slot order, each the CRC32C of the bytes written into that extent; "
                "an extent is only published after its checksum matches what the writer wrote")
        stored = existed = 0
        bad: list[str] = []
        # Checksums of all extents at once, each in pieces (native, GIL released): one pass
        # over memory per core instead of one core per chunk.
        got = list(crcs) if trust_crcs else self._piece_crc.crc_many([r[1].view for r in reservations],
                                                                     self._crc_pool)
        for n, crc in enumerate(got):
            i, res, meta = reservations.pop(0)
            want = crcs[n]
            if want != crc:
                self.abort(res)
                bad.append(f"chunks[{i}]: CRC32C {crc:#010x} of the written extent, the client said {want:#010x}")
                continue
            if self.commit(res, meta.with_payload(meta.encoding, meta.payload_bytes, crc), durability) is PutResult.STORED:
                stored += 1
            else:
                existed += 1
        if bad:
            raise DataLoss("; ".join(bad) + ". Those chunks were not stored (the others were): the client wrote "
                           "different bytes than it checksummed, or wrote outside its extent")
        return stored, existed

    def unbound_id(self, namespace_id: bytes) -> ChunkId:
        """A placeholder id for an unbound reservation in ``namespace_id`` (the tenant it is
        charged to): unique, and never a real chunk's (it is not ``namespace_id || key``)."""
        return ChunkId(bytes(namespace_id) + b"\xffunbound" + next(self._unbound).to_bytes(8, "little"))

    def commit_bound(self, bound: list[tuple[int, Reservation, ChunkMeta, ChunkId, int]], durability: Durability,
                     trust_crcs: bool = False) -> tuple[int, int, list[int]]:
        """Commits unbound reservations under the keys a writer named for them: each
        ``(slot index, reservation, meta, chunk id, crc32c)`` is moved to its chunk id
        (``SharedMemoryTier.rebind``), verified against its CRC32C (unless ``trust_crcs``, as
        in ``commit_many``), then committed. One whose id any tier holds already, or that is
        being written, is given back and counted as existing. Entries are popped from
        ``bound`` as they are handled (the caller aborts the rest). Returns ``(stored,
        existed, existed slot indices)``; DataLoss after the others when an extent does not
        match its CRC32C."""
        s = self._shared()
        self._chain.check_put(durability)
        fresh: list[tuple[int, Reservation, ChunkMeta]] = []
        crcs: list[int] = []
        existed_slots: list[int] = []
        try:
            while bound:
                i, res, meta, cid, crc = bound[0]
                if self._chain.medium_of(cid) is not None or not s.rebind(res, cid):
                    bound.pop(0)
                    s.abort(res)
                    existed_slots.append(i)
                    continue
                fresh.append(bound.pop(0)[:3])
                crcs.append(crc)
            stored, existed = self.commit_many(fresh, crcs, durability, trust_crcs)
        finally:
            for _, res, _ in fresh:     # what commit_many did not get to (it pops what it handles)
                s.abort(res)
        return stored, existed + len(existed_slots), existed_slots

    def abort(self, res: Reservation) -> None:
        self._shared().abort(res)

    def close(self) -> None:
        self._crc_pool.shutdown(wait=True)
