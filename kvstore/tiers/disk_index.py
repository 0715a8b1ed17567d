"""The disk tier's LMDB index (chunk id -> packed entry), opened safely and grown on demand.

``DiskIndex(path, map_bytes, fsync)`` checks the index before mapping it
(``disk_recovery.index_problem``); a damaged index, or one another format version wrote, is
set aside and a fresh, empty one created, and ``rebuilt_reason`` says why (the disk tier then
re-indexes every chunk file). ``write`` commits puts and deletes in one transaction and grows a
full map (doubling) instead of failing.

Threading: ``write`` is serialised by an internal lock; ``items`` is for start-up only (before
any write), because growing the map needs that no read transaction is open.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Iterable, Iterator

import lmdb

from ..errors import ResourceExhausted, Unavailable
from .disk_recovery import index_problem, set_aside

log = logging.getLogger(__name__)

#: Named databases: ``chunks`` (id -> entry) and ``meta`` (format version).
MAX_DBS = 2
#: ``meta`` key holding the index format; another value means the index is rebuilt.
FORMAT_KEY, FORMAT = b"format", b"kvstore-disk-index-1"
#: Largest the map grows to on its own before a write fails naming disk.index_map_bytes.
MAX_MAP_BYTES = 1 << 40


class DiskIndex:
    def __init__(self, path: Path, map_bytes: int, fsync: bool) -> None:
        self.path = path
        self.map_bytes = map_bytes
        self._opts = dict(max_dbs=MAX_DBS, sync=fsync, metasync=fsync, subdir=True)
        self._lock = threading.Lock()
        self._env: lmdb.Environment | None = None
        #: Why the index was found damaged and recreated empty; None when it was sound.
        self.rebuilt_reason: str | None = index_problem(path, MAX_DBS)
        if self.rebuilt_reason is None:
            try:
                self._open()
                self.rebuilt_reason = self._format_problem()
            except lmdb.Error as err:
                self.rebuilt_reason = f"LMDB cannot open it: {err}"
            if self.rebuilt_reason is not None:
                self.close()
        if self.rebuilt_reason is not None:
            aside = set_aside(path)
            log.error("disk index %s is damaged (%s); moved it to %s and rebuilding it from the chunk files",
                      path, self.rebuilt_reason, aside)
            self._open()
        with self._env.begin(write=True, db=self._meta) as txn:
            txn.put(FORMAT_KEY, FORMAT)

    def _open(self) -> None:
        self._env = lmdb.open(str(self.path), map_size=self.map_bytes, **self._opts)
        self.map_bytes = max(self.map_bytes, self._env.info()["map_size"])
        self._chunks = self._env.open_db(b"chunks")
        self._meta = self._env.open_db(b"meta")

    def _format_problem(self) -> str | None:
        with self._env.begin(db=self._meta) as txn:
            fmt = txn.get(FORMAT_KEY)
        if fmt is not None and bytes(fmt) != FORMAT:
            return f"index format {bytes(fmt)!r}, this daemon writes {FORMAT!r}"
        return None

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value), copied out (start-up only)."""
        with self._env.begin(db=self._chunks) as txn:
            rows = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
        return iter(rows)

    def write(self, puts: Iterable[tuple[bytes, bytes]] = (), dels: Iterable[bytes] = ()) -> None:
        """Commits ``puts`` and ``dels`` in one transaction. Raises ResourceExhausted when the map
        cannot grow, Unavailable when LMDB fails (a restart rebuilds the index)."""
        puts, dels = list(puts), list(dels)
        with self._lock:
            while True:
                try:
                    with self._env.begin(write=True, db=self._chunks) as txn:
                        for k in dels:
                            txn.delete(k)
                        for k, v in puts:
                            txn.put(k, v)
                    return
                except lmdb.MapFullError:
                    self._grow_locked()
                except lmdb.Error as err:
                    raise Unavailable(f"the disk index {self.path} failed: {err}; restart the daemon to rebuild "
                                      "it from the chunk files") from err

    def _grow_locked(self) -> None:
        want = max(self._env.info()["map_size"], self.map_bytes) * 2
        if want > MAX_MAP_BYTES:
            raise ResourceExhausted(f"the disk index is full at {self.map_bytes} bytes and cannot grow further; "
                                    "raise disk.index_map_bytes or lower disk.capacity_bytes")
        try:
            self._env.set_mapsize(want)
        except lmdb.Error as err:
            raise ResourceExhausted(f"the disk index is full and growing it to {want} bytes failed ({err}); "
                                    "raise disk.index_map_bytes or free space on disk.path") from err
        log.info("disk index map grew from %d to %d bytes (disk.index_map_bytes)", self.map_bytes, want)
        self.map_bytes = want

    def close(self) -> None:
        env, self._env = self._env, None
        if env is not None:
            env.close()
