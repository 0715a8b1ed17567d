"""Start-up checks of the disk tier's LMDB index, done before the daemon maps it.

LMDB maps ``data.mdb`` into memory, so a damaged file does not fail politely: zeroed or
flipped meta pages fail ``lmdb.open``, a file truncated below its last page faults (SIGBUS)
on the first access, and damaged B-tree pages can crash the process. The chunk files are
self-describing (header + CRC32C), so the index is only a cache of them; ``index_problem``
decides whether the index can be trusted and the disk tier rebuilds it from the files when not.

Two checks, cheapest first:
1. ``_meta_problem``: parse both meta pages by hand (layout of LMDB 0.9, 64-bit): magic,
   data version, the newest meta's last page against the file size, the roots of both trees.
2. ``_traversal_problem``: open the index read-only in a *child process* and read every entry
   of every database. A crash (signal) or an LMDB error there marks the index damaged
   without taking the daemon down.
"""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: LMDB 0.9 on-disk constants (lmdb/mdb.c).
MDB_MAGIC = 0xBEEFC0DE
MDB_DATA_VERSION = 1
_P_META = 0x08
_P_INVALID = 2**64 - 1
#: Page header: pgno, pad, flags, lower, upper.
_PAGE_HEAD = struct.Struct("<QHHHH")
#: Meta page body after the page header: magic, version, address, map size.
_META_HEAD = struct.Struct("<IIQQ")
#: One MDB_db: pad (page size in the free DB), flags, depth, branch, leaf, overflow pages, entries, root.
_DB = struct.Struct("<IHHQQQQQ")
_LAST = struct.Struct("<QQ")          # last page number, txn id
_META_AT = _PAGE_HEAD.size
_DBS_AT = _META_AT + _META_HEAD.size
_LAST_AT = _DBS_AT + 2 * _DB.size
_MIN_PAGE_BYTES = 512
_MAX_PAGE_BYTES = 65536

#: Seconds the child process gets to read every index entry before the index counts as damaged.
TRAVERSAL_TIMEOUT_S = 300.0
#: Seconds between progress lines while the index is rebuilt.
PROGRESS_EVERY_S = 2.0

_CHILD = r"""
import sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, lock=False, subdir=True, max_dbs=int(sys.argv[2]))
n = 0
with env.begin() as txn:
    names = [bytes(k) for k, _ in txn.cursor()]
for name in names:
    db = env.open_db(name, create=False)
    with env.begin(db=db) as txn:
        for k, v in txn.cursor():
            n += len(k) + len(v)
print(n)
"""


@dataclass(frozen=True, slots=True)
class _Meta:
    page_bytes: int
    last_page: int
    txn_id: int
    roots: tuple[int, int]


def _parse_meta(buf: bytes, at: int) -> _Meta | str:
    if len(buf) < at + _LAST_AT + _LAST.size:
        return "meta page is cut off"
    _pgno, _pad, flags, _lo, _up = _PAGE_HEAD.unpack_from(buf, at)
    magic, version, _addr, _map = _META_HEAD.unpack_from(buf, at + _META_AT)
    if not flags & _P_META or magic != MDB_MAGIC:
        return "meta page has no LMDB magic"
    if version != MDB_DATA_VERSION:
        return f"LMDB data version {version}, expected {MDB_DATA_VERSION}"
    free_db = _DB.unpack_from(buf, at + _DBS_AT)
    main_db = _DB.unpack_from(buf, at + _DBS_AT + _DB.size)
    last, txn = _LAST.unpack_from(buf, at + _LAST_AT)
    return _Meta(free_db[0], last, txn, (free_db[7], main_db[7]))


def _meta_problem(data: Path) -> str | None:
    size = data.stat().st_size
    with open(data, "rb") as fh:
        head = fh.read(_MAX_PAGE_BYTES + _LAST_AT + _LAST.size)
    first = _parse_meta(head, 0)
    if isinstance(first, str):
        return f"meta page 0: {first}"
    psize = first.page_bytes
    if not (_MIN_PAGE_BYTES <= psize <= _MAX_PAGE_BYTES) or psize & (psize - 1):
        return f"meta page 0 names an impossible page size {psize}"
    second = _parse_meta(head, psize)
    if isinstance(second, str):
        return f"meta page 1: {second}"
    newest = max(first, second, key=lambda m: m.txn_id)
    need = (newest.last_page + 1) * psize
    if size < need or size % psize:
        return f"data.mdb has {size} bytes but its newest meta page needs {need} (truncated)"
    for root in newest.roots:
        if root != _P_INVALID and not (2 <= root <= newest.last_page):
            return f"a tree root points at page {root}, outside the file's {newest.last_page + 1} pages"
    return None


def _traversal_problem(index_dir: Path, max_dbs: int) -> str | None:
    try:
        r = subprocess.run([sys.executable, "-c", _CHILD, str(index_dir), str(max_dbs)], capture_output=True,
                           text=True, timeout=TRAVERSAL_TIMEOUT_S, env={**os.environ, "PYTHONPATH": ""})
    except subprocess.TimeoutExpired:
        return f"reading every index entry took over {TRAVERSAL_TIMEOUT_S:.0f}s"
    if r.returncode < 0:
        return f"reading the index crashed a checker process (signal {-r.returncode})"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"reading the index failed: {last}"
    return None


def index_problem(index_dir: Path, max_dbs: int) -> str | None:
    """Why the LMDB index under ``index_dir`` cannot be opened safely, or None when it can
    (also None when there is no index yet: LMDB creates one)."""
    data = index_dir / "data.mdb"
    if not index_dir.exists():
        return None
    if not index_dir.is_dir():
        return f"{index_dir} is not a directory"
    if not data.exists():
        return None if not any(index_dir.iterdir()) else "data.mdb is missing"
    if data.stat().st_size == 0:
        return "data.mdb is empty"
    return _meta_problem(data) or _traversal_problem(index_dir, max_dbs)


def set_aside(index_dir: Path) -> Path:
    """Moves a damaged index out of the way (replacing an older one) so a fresh one can be built;
    returns where it went. The old copy is kept only for a post-mortem."""
    aside = index_dir.with_name(index_dir.name + ".damaged")
    if aside.exists():
        for f in aside.iterdir():
            f.unlink()
        aside.rmdir()
    index_dir.rename(aside)
    return aside


@dataclass(slots=True)
class RecoveryReport:
    """What the start-up reconciliation of index and chunk files did."""

    rebuilt: bool = False           #: the index was damaged and rebuilt from the chunk files
    reason: str = ""                #: why it was rebuilt
    chunks: int = 0                 #: chunks served after recovery
    bytes: int = 0                  #: their file bytes
    adopted: int = 0                #: chunk files without an index entry, verified and re-indexed
    quarantined: int = 0            #: damaged chunk files (bad header, wrong size) removed
    stale_entries: int = 0          #: index entries without a usable chunk file, dropped
    temp_files: int = 0             #: unfinished writes removed

    def summary(self) -> str:
        head = f"disk index rebuilt ({self.reason}): " if self.rebuilt else "disk index ok: "
        return (f"{head}{self.chunks} chunks ({self.bytes} bytes) served; {self.adopted} re-indexed, "
                f"{self.quarantined} damaged files removed, {self.stale_entries} stale entries dropped, "
                f"{self.temp_files} unfinished writes removed")


class Progress:
    """Logs ``done/total`` at most every ``PROGRESS_EVERY_S`` (a rebuild of many files takes a while)."""

    def __init__(self, what: str, total: int) -> None:
        self._what, self._total = what, total
        self._next = time.monotonic() + PROGRESS_EVERY_S

    def step(self, done: int) -> None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + PROGRESS_EVERY_S
            log.info("%s: %d/%d (%.0f%%)", self._what, done, self._total, 100 * done / max(self._total, 1))
