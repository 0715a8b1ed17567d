"""The disk tier: one self-describing file per chunk plus an LMDB index of metadata.

Layout under ``DiskConfig.path``::

    LOCK                        flock'ed while a daemon owns the directory
    index.lmdb/                 LMDB: cid -> file bytes, last access, hits, ChunkMeta
    chunks/<2 hex>/<cid hex>    record header + payload (see ``_Header``)

Write protocol (``put``): write ``<name>.tmp.*`` -> fsync (``DiskConfig.fsync``) -> rename ->
fsync the directory -> commit the index entry (LMDB ``sync`` follows ``fsync``). A SIGKILL at
any point leaves either a temp file (removed at start), a renamed file without an index entry
(verified and adopted at start) or a complete chunk. Reads verify the header and the payload's
CRC32C every time: a torn, truncated, flipped or missing file is deleted with its index entry,
counted in ``stats().corrupt`` and reported as a miss; corrupt bytes are never returned.

Recovery: the index is a cache of the self-describing chunk files. ``DiskIndex`` checks it
before mapping it and recreates it when damaged; start-up then re-indexes every chunk file
whose header verifies (``recovery`` reports the counts). A full index map grows. The
``Scrubber`` verifies cold chunks in the background (``disk.scrub_bytes_per_s``); ``scrub``
verifies all of them now.

Threading: every method is thread-safe. ``get``/``put``/``delete``/``evict`` do file I/O and
are called from worker threads (the manager's writer thread, RPC workers), never from the
event loop; ``contains``/``scan``/``stats`` read only the in-memory view of the index.
Concurrent operations on the same id are serialised (a second ``put`` waits for the first);
operations on different ids run in parallel.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .. import config as cfg
import kvstore_native as native
from ..errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from ..types import CHUNK_ID_BYTES, ChunkId, ChunkMeta, Medium
from ..quotas import TierAccount
from .base import ChunkRef, EntryInfo, PinTable, Tier, TierStats
from .disk_index import DiskIndex
from .disk_recovery import Progress, RecoveryReport
from .scrubber import Scrubber, ScrubReport, scrub_all
from .policies import make_policy

log = logging.getLogger(__name__)

FILE_MAGIC = b"KVSC"
FILE_VERSION = 1
#: magic, version, meta length, cid; then the meta bytes, then a CRC32C of all of the above.
_HEAD = struct.Struct(f"<4sHH{CHUNK_ID_BYTES}s")
_CRC = struct.Struct("<I")
#: Index value prefix: file bytes, last access (unix s), hits; then ``ChunkMeta.to_bytes()``.
_INDEX = struct.Struct("<QdQ")
_INDEX_DIR = "index.lmdb"
#: Most metadata bytes read when adopting a chunk file (``ChunkMeta`` is far smaller).
_MAX_META_BYTES = 1024
_TMP_MARK = ".tmp."


def encode_header(cid: ChunkId, meta: ChunkMeta) -> bytes:
    mb = meta.to_bytes()
    head = _HEAD.pack(FILE_MAGIC, FILE_VERSION, len(mb), cid) + mb
    return head + _CRC.pack(native.crc32c(head))


def decode_header(buf: memoryview) -> tuple[ChunkId, ChunkMeta, int] | None:
    """(cid, meta, header bytes) of a record, or None when the header is not intact."""
    if len(buf) < _HEAD.size:
        return None
    magic, version, meta_len, cid = _HEAD.unpack_from(buf)
    end = _HEAD.size + meta_len
    if magic != FILE_MAGIC or version != FILE_VERSION or len(buf) < end + _CRC.size:
        return None
    if _CRC.unpack_from(buf, end)[0] != native.crc32c(buf[:end]):
        return None
    try:
        meta = ChunkMeta.from_bytes(bytes(buf[_HEAD.size:end]))
    except ValueError:
        return None
    return ChunkId(cid), meta, end + _CRC.size


@dataclass(slots=True, eq=False)
class _Entry:
    meta: ChunkMeta
    file_bytes: int
    last_access_s: float
    hits: int = 0
    tenant: str | None = None   # charged ``file_bytes`` (quotas.max_disk_bytes); None: nobody


class DiskTier(Tier):
    medium = Medium.DISK

    def __init__(self, conf: cfg.DiskConfig, pins: PinTable, clock: Callable[[], float], *,
                 start_scrubber: bool = True, account: TierAccount | None = None) -> None:
        """Opens (and if needed rebuilds) the index, reconciles it with the chunk files and starts
        the background scrubber when ``conf.scrub_bytes_per_s`` > 0 (and ``start_scrubber``).
        ``account``: charges each chunk file to its tenant (``quotas.max_disk_bytes``) from the
        moment its write starts until it is unlinked; rebuilt from the index on start-up. A
        tenant at its quota first evicts its own chunks, least recently used first.
        ``recovery`` then says what start-up found. Raises FailedPrecondition when another daemon
        owns the directory, Unavailable when the directory cannot be used."""
        self._root = Path(conf.path)
        self._chunks = self._root / "chunks"
        self._fsync = conf.fsync
        self._capacity = conf.capacity_bytes
        self._pins = pins
        self._clock = clock
        self._account = account
        self._policy = make_policy(conf.policy, conf.capacity_bytes)
        # Lock order: TierManager._lock -> DiskTier._lock -> PinTable._lock. ``_lock`` guards
        # the in-memory view and is never held during I/O; ``_db_lock`` serialises LMDB write
        # transactions and is never taken while ``_lock`` is held (nor the reverse).
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)   # an id left ``_busy``
        self._db_lock = threading.Lock()
        self._index: dict[ChunkId, _Entry] = {}
        self._busy: set[ChunkId] = set()   # ids with a write or delete in flight
        self._reserved_bytes = 0           # bytes of writes in flight
        self._dirty_access: set[ChunkId] = set()
        self._stats = TierStats(Medium.DISK, self._policy.name, conf.capacity_bytes)
        self._closed = False

        self._root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self._root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise FailedPrecondition(f"{self._root} is in use by another kvstore daemon; stop it or "
                                     "set disk.path to another directory") from None
        for i in range(256):
            (self._chunks / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        self._db: DiskIndex | None = None
        try:
            self._db = DiskIndex(self._root / _INDEX_DIR, conf.index_map_bytes, conf.fsync)
            self.recovery = RecoveryReport(self._db.rebuilt_reason is not None, self._db.rebuilt_reason or "")
            self._recover(self.recovery)
        except BaseException:
            if self._db is not None:
                self._db.close()
            os.close(self._lock_fd)
            raise
        log.info("%s", self.recovery.summary())
        self._scrubber: Scrubber | None = None
        if conf.scrub_bytes_per_s > 0 and start_scrubber:
            self._scrubber = Scrubber(self, conf.scrub_bytes_per_s)
            self._scrubber.start()

    # -- paths and index helpers ------------------------------------------------------------
    def _file(self, cid: ChunkId) -> Path:
        h = cid.hex()
        return self._chunks / h[:2] / h

    def _db_write(self, puts: list[tuple[ChunkId, _Entry]] = (), dels: list[ChunkId] = ()) -> None:
        self._db.write(((cid, _INDEX.pack(e.file_bytes, e.last_access_s, e.hits) + e.meta.to_bytes())
                        for cid, e in puts), dels)

    # -- start-up ---------------------------------------------------------------------------
    def _recover(self, report: RecoveryReport) -> None:
        """Reconciles the index with the files (runs before the tier serves anything)."""
        bad: list[ChunkId] = []
        for k, v in self._db.items():
            try:
                size, last, hits = _INDEX.unpack_from(v)
                self._index[ChunkId(k)] = _Entry(ChunkMeta.from_bytes(v[_INDEX.size:]), size, last, hits)
            except (struct.error, ValueError) as e:
                log.warning("dropping unreadable index entry %s: %s", k.hex(), e)
                bad.append(ChunkId(k))
        seen: set[ChunkId] = set()
        adopted: list[tuple[ChunkId, _Entry]] = []
        shards = sorted(self._chunks.iterdir())
        progress = Progress("re-indexing chunk files (shard directories)", len(shards))
        for n, shard in enumerate(shards):
            progress.step(n)
            for f in shard.iterdir():
                if _TMP_MARK in f.name:
                    f.unlink(missing_ok=True)       # a write that never completed
                    report.temp_files += 1
                    continue
                try:
                    cid = ChunkId(bytes.fromhex(f.name))
                    if len(cid) != CHUNK_ID_BYTES:
                        raise ValueError(f.name)
                except ValueError:
                    log.warning("ignoring foreign file %s in the chunk directory", f)
                    continue
                size = f.stat().st_size
                e = self._index.get(cid)
                if e is not None:
                    if size == e.file_bytes:
                        seen.add(cid)
                    else:                           # truncated or replaced: not trusted
                        f.unlink(missing_ok=True)
                        self._stats.corrupt += 1
                        report.quarantined += 1
                    continue
                e = self._adopt(cid, f, size)
                if e is None:
                    f.unlink(missing_ok=True)
                    self._stats.corrupt += 1
                    report.quarantined += 1
                else:
                    adopted.append((cid, e))
                    self._index[cid] = e
                    seen.add(cid)
        missing = [c for c in self._index if c not in seen]
        for c in missing:
            del self._index[c]
        report.adopted, report.stale_entries = len(adopted), len(missing) + len(bad)
        self._db_write(adopted, bad + missing)
        for cid, e in sorted(self._index.items(), key=lambda kv: kv[1].last_access_s):
            self._policy.insert(cid, e.file_bytes)
            self._stats.used_bytes += e.file_bytes
            if self._account is not None:   # what each tenant holds, as found (may be over a lowered quota)
                e.tenant = self._account.tenant(cid)
                self._account.charge(e.tenant, e.file_bytes, enforce=False)
        self._stats.chunks = len(self._index)
        if self._stats.used_bytes > self._capacity:
            self.evict(self._stats.used_bytes - self._capacity)
        report.chunks, report.bytes = self._stats.chunks, self._stats.used_bytes

    def _adopt(self, cid: ChunkId, f: Path, size: int) -> _Entry | None:
        try:
            with open(f, "rb") as fh:
                head = memoryview(fh.read(_HEAD.size + _MAX_META_BYTES))
        except OSError as err:
            log.warning("cannot read chunk file %s (%s); removing it", f, err)
            return None
        d = decode_header(head)
        if d is None or d[0] != cid or size != d[2] + d[1].payload_bytes:
            return None
        return _Entry(d[1], size, f.stat().st_mtime)

    # -- Tier primitives --------------------------------------------------------------------
    def contains(self, cid: ChunkId) -> bool:
        with self._lock:
            return cid in self._index

    def get(self, cid: ChunkId) -> ChunkRef | None:
        with self._lock:
            e = self._index.get(cid)
            if e is None:
                self._stats.misses += 1
                return None
        path = self._file(cid)
        try:
            with open(path, "rb", buffering=0) as fh:
                size = os.fstat(fh.fileno()).st_size
                buf = np.empty(size, dtype=np.uint8)
                got = fh.readinto(memoryview(buf)) if size else 0
        except FileNotFoundError:
            return self._drop_corrupt(cid, e, "its file is missing")
        except OSError as err:
            raise Unavailable(f"reading {path} failed: {err}; check the disk behind disk.path") from err
        view = memoryview(buf)[:got]
        d = decode_header(view)
        if d is None or d[0] != cid:
            return self._drop_corrupt(cid, e, "its record header is damaged")
        _, meta, hlen = d
        payload = view[hlen:]
        if len(payload) != meta.payload_bytes:
            return self._drop_corrupt(cid, e, f"it has {len(payload)} payload bytes, expected {meta.payload_bytes}")
        if native.crc32c(payload) != meta.crc32c:
            return self._drop_corrupt(cid, e, "its payload failed the CRC32C check")
        with self._lock:
            self._stats.hits += 1
            if self._index.get(cid) is e:
                e.hits += 1
                e.last_access_s = self._clock()
                self._policy.touch(cid)
                self._dirty_access.add(cid)
        return ChunkRef(cid, meta, payload.toreadonly(), Medium.DISK)

    def _drop_corrupt(self, cid: ChunkId, e: _Entry, why: str) -> None:
        with self._lock:
            self._stats.misses += 1
            if self._index.get(cid) is not e or cid in self._busy:
                return None                       # deleted or replaced meanwhile: a plain miss
            self._stats.corrupt += 1
            self._unlink_locked(cid, e, evicted=False)
            self._busy.add(cid)
        log.error("disk chunk %s is corrupt (%s); deleted it and reporting a miss", cid.hex(), why)
        try:
            self._remove_files_and_index([cid])
        finally:
            self._done([cid])
        return None

    def _unlink_locked(self, cid: ChunkId, e: _Entry, evicted: bool) -> None:
        del self._index[cid]
        self._notify(cid, False)
        self._policy.remove(cid, evicted=evicted)
        self._dirty_access.discard(cid)
        self._stats.used_bytes -= e.file_bytes
        self._stats.chunks -= 1
        if evicted:
            self._stats.evictions += 1
        if e.tenant is not None:
            self._account.release(e.tenant, e.file_bytes)
            e.tenant = None

    def _remove_files_and_index(self, cids: list[ChunkId]) -> None:
        for cid in cids:
            self._file(cid).unlink(missing_ok=True)
        if cids:
            self._db_write(dels=cids)

    def _done(self, cids) -> None:
        with self._lock:
            self._busy.difference_update(cids)
            self._idle.notify_all()

    def put(self, cid: ChunkId, meta: ChunkMeta, payload: memoryview | bytes) -> bool:
        n = memoryview(payload).nbytes
        if n != meta.payload_bytes:
            raise InvalidArgument(f"payload has {n} bytes but its metadata says {meta.payload_bytes}")
        if native.crc32c(payload) != meta.crc32c:
            raise InvalidArgument("payload CRC32C does not match its metadata; the sender must compute "
                                  "ChunkMeta.crc32c over the exact payload bytes")
        header = encode_header(cid, meta)
        size = len(header) + n
        tenant = self._account.tenant(cid) if self._account is not None else None
        refused: ResourceExhausted | None = None
        with self._lock:
            while cid in self._busy:
                self._idle.wait()
            if cid in self._index:
                return False
            if size > self._capacity:
                raise ResourceExhausted(f"a chunk of {size} bytes does not fit disk.capacity_bytes="
                                        f"{self._capacity}; raise disk.capacity_bytes")
            victims, enough = self._pick_victims_locked(self._account.excess(tenant, size), tenant) \
                if tenant is not None else ([], True)
            try:
                self._account.charge(tenant, size) if tenant is not None else None
            except ResourceExhausted as err:
                refused, enough = err, False
            if enough:
                more, enough = self._pick_victims_locked(
                    self._stats.used_bytes + self._reserved_bytes + size - self._capacity)
                victims += more
                if enough:
                    self._busy.add(cid)
                    self._reserved_bytes += size
                elif tenant is not None:
                    self._account.release(tenant, size)
        if not enough:
            try:
                self._remove_files_and_index(victims)
            finally:
                self._done(victims)
            if refused is not None:
                raise refused
            raise ResourceExhausted(
                f"disk tier cannot make room for {size} bytes: the remaining chunks are pinned or being "
                "written; unpin chunks (kvctl unpin) or raise disk.capacity_bytes")
        entry = _Entry(meta, size, self._clock(), tenant=tenant)
        ok = written = False
        try:
            for v in victims:
                self._file(v).unlink(missing_ok=True)
            self._write_file(cid, header, payload)
            written = True
            # The index entry is committed only after the file is durable under its final name.
            self._db_write(puts=[(cid, entry)], dels=victims)
            ok = True
        finally:
            if written and not ok:
                # No index entry: a file left behind would sit outside capacity accounting.
                self._file(cid).unlink(missing_ok=True)
            if not ok and victims:
                self._db_write(dels=victims)
            with self._lock:
                self._reserved_bytes -= size
                if not ok and tenant is not None:
                    self._account.release(tenant, size)
                if ok:
                    self._index[cid] = entry
                    self._notify(cid, True)
                    self._policy.insert(cid, size)
                    self._stats.used_bytes += size
                    self._stats.chunks += 1
                self._busy.discard(cid)
                self._busy.difference_update(victims)
                self._idle.notify_all()
        return True

    def _write_file(self, cid: ChunkId, header: bytes, payload) -> None:
        final = self._file(cid)
        tmp = final.with_name(f"{final.name}{_TMP_MARK}{os.getpid()}.{threading.get_ident()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for part in (memoryview(header), memoryview(payload).cast("B")):
                    while len(part):
                        part = part[os.write(fd, part):]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            if self._fsync:
                dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise Unavailable(f"writing {final} failed: {err}; check free space and health of disk.path") from err

    def _pick_victims_locked(self, need_bytes: int, tenant: str | None = None) -> tuple[list[ChunkId], bool]:
        """Unlinks (in memory) unpinned, idle chunks by policy until ``need_bytes`` are freed;
        returns them (marked busy: the caller removes their files and index entries, then
        calls ``_done``) and whether enough was freed. ``tenant``: only that tenant's chunks,
        least recently used first (the shared policy is not walked: other tenants' state is
        untouched)."""
        out: list[ChunkId] = []
        freed = 0
        if need_bytes <= 0:
            return out, True
        if tenant is None:
            order = self._policy.victims()
        else:
            order = [c for c, _ in sorted(((c, e) for c, e in self._index.items() if e.tenant == tenant),
                                          key=lambda ce: ce[1].last_access_s)]
        for cid in order:
            if cid in self._busy or self._pins.is_pinned(cid):
                continue
            e = self._index[cid]
            self._unlink_locked(cid, e, evicted=True)
            self._busy.add(cid)
            out.append(cid)
            freed += e.file_bytes
            if freed >= need_bytes:
                break
        return out, freed >= need_bytes

    def delete(self, cid: ChunkId) -> bool:
        with self._lock:
            while cid in self._busy:
                self._idle.wait()
            e = self._index.get(cid)
            if e is None:
                return False
            self._unlink_locked(cid, e, evicted=False)
            self._busy.add(cid)
        try:
            self._remove_files_and_index([cid])
        finally:
            self._done([cid])
        return True

    def evict(self, nbytes: int) -> list[ChunkId]:
        with self._lock:
            need = nbytes - (self._capacity - self._stats.used_bytes - self._reserved_bytes)
            victims, _ = self._pick_victims_locked(need)   # as much as can be evicted
        try:
            self._remove_files_and_index(victims)
        finally:
            self._done(victims)
        return victims

    def scan(self, prefix: bytes = b"", after: bytes = b"", limit: int = 0) -> Iterator[EntryInfo]:
        with self._lock:
            rows = [EntryInfo(c, e.meta, e.last_access_s, e.hits) for c, e in self._index.items()
                    if c.startswith(prefix) and c > after]
        rows.sort(key=lambda r: r.cid)
        return iter(rows[:limit] if limit else rows)

    def stats(self) -> TierStats:
        with self._lock:
            s = TierStats(**{f: getattr(self._stats, f) for f in TierStats.__slots__})
            ids = list(self._index)
        s.pinned_chunks = sum(1 for c in ids if self._pins.is_pinned(c))
        return s

    # -- verification ---------------------------------------------------------------------
    def verify(self, cid: ChunkId) -> tuple[bool, int] | None:
        """Re-reads ``cid``'s file and checks its header and CRC32C without counting a hit or
        touching the eviction order. Returns (intact, file bytes), or None when ``cid`` is not
        stored (or went away meanwhile). A damaged chunk is deleted and counted as corrupt."""
        with self._lock:
            e = self._index.get(cid)
            if e is None or cid in self._busy:
                return None
        why = self._check_file(cid, e)
        if why is None:
            return True, e.file_bytes
        with self._lock:
            if self._index.get(cid) is not e or cid in self._busy:
                return None               # deleted or replaced while we read: not damage
            self._stats.misses -= 1       # _drop_corrupt counts a read miss; a scrub is no read
        self._drop_corrupt(cid, e, why)
        return False, e.file_bytes

    def _check_file(self, cid: ChunkId, e: _Entry) -> str | None:
        try:
            with open(self._file(cid), "rb", buffering=0) as fh:
                buf = memoryview(fh.read())
        except FileNotFoundError:
            return "its file is missing"
        except OSError as err:
            raise Unavailable(f"reading {self._file(cid)} failed: {err}; check the disk behind disk.path") from err
        d = decode_header(buf)
        if d is None or d[0] != cid:
            return "its record header is damaged"
        payload = buf[d[2]:]
        if len(payload) != d[1].payload_bytes:
            return f"it has {len(payload)} payload bytes, expected {d[1].payload_bytes}"
        if native.crc32c(payload) != d[1].crc32c:
            return "its payload failed the CRC32C check"
        return None

    def cold_ids(self, accessed_before_s: float = float("inf")) -> list[ChunkId]:
        """Stored ids last accessed before ``accessed_before_s``, coldest first (what the scrubber walks)."""
        with self._lock:
            rows = [(e.last_access_s, c) for c, e in self._index.items() if e.last_access_s < accessed_before_s]
        rows.sort()
        return [c for _, c in rows]

    def scrub(self, progress: Callable[[ScrubReport], None] | None = None) -> ScrubReport:
        """Verifies every stored chunk now (``kvctl verify``); ``progress`` gets the running report."""
        return scrub_all(self, progress)

    def close(self) -> None:
        """Persists access times (eviction order for the next start) and closes the index.
        Callers stop issuing operations first (the manager drains its writer)."""
        if self._scrubber is not None:
            self._scrubber.stop()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            dirty = [(c, self._index[c]) for c in self._dirty_access if c in self._index]
            self._dirty_access.clear()
        if dirty:
            self._db_write(puts=dirty)
        self._db.close()
        os.close(self._lock_fd)
