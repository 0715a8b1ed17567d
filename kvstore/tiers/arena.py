"""The DRAM tier's host arena (one mapping, allocated once) and its page allocator.

``HostArena`` maps ``capacity_bytes`` once: anonymous memory, or a named file under
``/dev/shm`` so local client processes can map the same bytes (``arena.path``) and read a
chunk at ``(offset, nbytes)`` without a copy through gRPC.

``PageAllocator`` hands out contiguous page extents: best fit over a size index, with free
neighbours coalesced on free. Both indexes are sorted Python lists searched with ``bisect``
(O(log n) search; inserts are a C ``memmove`` of the list, cheap at the extent counts an
arena of whole-chunk extents has). Not thread-safe: the DRAM tier calls it under its lock.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import re
from pathlib import Path

from ..domain.errors import InvalidArgument, ResourceExhausted

log = logging.getLogger(__name__)

#: Where named arenas live (tmpfs on Linux).
SHM_DIR = Path("/dev/shm")
#: ``dram.shm_name`` value that names the arena after the daemon's pid.
AUTO_SHM_NAME = "auto"
AUTO_PREFIX, AUTO_SUFFIX = "kvstore-", ".arena"


def remove_stale_arenas() -> int:
    """Removes auto-named arenas of daemons that no longer run (a SIGKILLed daemon cannot
    remove its own, and tmpfs pages are RAM). Only files this user owns are touched."""
    removed = 0
    try:
        candidates = list(SHM_DIR.glob(f"{AUTO_PREFIX}*"))
    except OSError:
        return 0
    for f in candidates:
        # The arena, the presence index and the control socket beside it (kvstore-<pid>.arena /
        # .index / .arena.ctl), and the HBM pool's generation counters (kvstore-<pid>-<hex>.hbmgen).
        m = re.fullmatch(rf"{AUTO_PREFIX}(\d+)(?:\.(?:arena|index|arena\.ctl)|-[0-9a-f]+\.hbmgen)", f.name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            if f.stat().st_uid != os.getuid():
                continue
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)
            removed += 1
            log.info("removed stale shared-memory arena %s", f)
        except OSError:
            continue
    return removed


class PageAllocator:
    """Best-fit allocator of contiguous runs of pages in ``[0, total_pages)``."""

    def __init__(self, total_pages: int) -> None:
        if total_pages <= 0:
            raise ValueError("an allocator needs at least one page")
        self.total_pages = total_pages
        self.free_pages = total_pages
        self._starts: list[int] = [0]                 # free extent starts, sorted
        self._len_at: dict[int, int] = {0: total_pages}  # start -> length
        self._by_size: list[tuple[int, int]] = [(total_pages, 0)]  # (length, start), sorted

    def _add(self, start: int, length: int) -> None:
        bisect.insort(self._starts, start)
        self._len_at[start] = length
        bisect.insort(self._by_size, (length, start))

    def _drop(self, start: int) -> int:
        length = self._len_at.pop(start)
        del self._starts[bisect.bisect_left(self._starts, start)]
        del self._by_size[bisect.bisect_left(self._by_size, (length, start))]
        return length

    def alloc(self, npages: int) -> int | None:
        """Start page of a free run of ``npages`` (the smallest run that fits, lowest address
        among equals), or None when no run is long enough."""
        if npages <= 0:
            raise ValueError("allocate at least one page")
        i = bisect.bisect_left(self._by_size, (npages, -1))
        if i == len(self._by_size):
            return None
        length, start = self._by_size[i]
        self._drop(start)
        if length > npages:
            self._add(start + npages, length - npages)
        self.free_pages -= npages
        return start

    def candidates(self, npages: int, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` free runs that fit ``npages``, as (length, start) in best-fit order,
        plus the largest run (so a caller preferring some pages also sees the big one)."""
        i = bisect.bisect_left(self._by_size, (npages, -1))
        out = self._by_size[i:i + limit]
        if len(self._by_size) > i + limit:
            out.append(self._by_size[-1])
        return out

    def alloc_within(self, run_start: int, page: int, npages: int) -> int:
        """Takes ``[page, page + npages)`` from inside the free run that starts at
        ``run_start`` (from ``candidates``), leaving the pages on either side free."""
        length = self._len_at.get(run_start)
        assert length is not None and run_start <= page and page + npages <= run_start + length, \
            "pages outside the free run"
        self._drop(run_start)
        if page > run_start:
            self._add(run_start, page - run_start)
        end = run_start + length
        if page + npages < end:
            self._add(page + npages, end - page - npages)
        self.free_pages -= npages
        return page

    def free_runs_in(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The free pages of ``[lo, hi)`` as ``(start, end)`` runs, by address."""
        i = max(0, bisect.bisect_right(self._starts, lo) - 1)
        out = []
        while i < len(self._starts) and self._starts[i] < hi:
            s = self._starts[i]
            e = s + self._len_at[s]
            if e > lo:
                out.append((max(s, lo), min(e, hi)))
            i += 1
        return out

    def free(self, start: int, npages: int) -> None:
        """Returns a run obtained from ``alloc``; merges it with free neighbours."""
        assert 0 <= start and start + npages <= self.total_pages, "extent outside the arena"
        freed = npages
        i = bisect.bisect_left(self._starts, start)
        assert i == len(self._starts) or self._starts[i] >= start + npages, "double free"
        end = start + npages
        if i < len(self._starts) and self._starts[i] == end:
            npages += self._drop(end)
        if i > 0:
            prev = self._starts[i - 1]
            prev_len = self._len_at[prev]
            assert prev + prev_len <= start, "double free"
            if prev + prev_len == start:
                self._drop(prev)
                start, npages = prev, npages + prev_len
        self._add(start, npages)
        self.free_pages += freed

    def largest_free(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    def extents(self) -> list[tuple[int, int]]:
        """Free runs as (start, length), by address (tests and diagnostics)."""
        return [(s, self._len_at[s]) for s in self._starts]


class HostArena:
    """``capacity_bytes`` of host memory mapped once; ``buf`` is the writable view of all of it.

    With ``shm_name`` the mapping is the file ``/dev/shm/<shm_name>`` (created fresh,
    replacing a stale one left by a crashed daemon, and removed on ``close``); ``path`` names
    it for clients. Otherwise ``path`` is None.
    """

    def __init__(self, capacity_bytes: int, shm_name: str = "") -> None:
        if capacity_bytes <= 0:
            raise InvalidArgument("dram.capacity_bytes must be positive")
        self.capacity_bytes = capacity_bytes
        self.path: Path | None = None
        self._mmap: mmap.mmap | None = None
        if shm_name == AUTO_SHM_NAME:
            remove_stale_arenas()
            try:
                self._map_shared(SHM_DIR / f"{AUTO_PREFIX}{os.getpid()}{AUTO_SUFFIX}")
            except OSError as e:
                log.warning("no shared-memory arena (%s); local clients will use the gRPC stream path. "
                            "Give /dev/shm room for dram.capacity_bytes (docker: --shm-size) to enable it", e)
        elif shm_name:
            if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", shm_name) or shm_name in (".", ".."):
                raise InvalidArgument(f"dram.shm_name {shm_name!r} must be a plain file name "
                                      "(letters, digits, '.', '_', '-'), 'auto' or empty")
            path = SHM_DIR / shm_name
            if path.exists():
                log.warning("replacing stale shared-memory arena %s", path)
                path.unlink()
            try:
                self._map_shared(path)
            except OSError as e:
                raise ResourceExhausted(
                    f"cannot create the {capacity_bytes}-byte shared-memory arena {path}: {e}. Give /dev/shm "
                    "room for dram.capacity_bytes (docker: --shm-size), lower dram.capacity_bytes, or set "
                    "dram.shm_name = '' for a private arena") from None
        if self._mmap is None:
            self._mmap = mmap.mmap(-1, capacity_bytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = memoryview(self._mmap)

    def _map_shared(self, path: Path) -> None:
        """Creates, reserves (so a full tmpfs fails here, not with SIGBUS later) and maps ``path``."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, self.capacity_bytes)
                # fallocate gave the file its pages; MAP_POPULATE maps them all now.
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                self._mmap = mmap.mmap(fd, self.capacity_bytes, flags, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError:
                path.unlink(missing_ok=True)
                raise
        finally:
            os.close(fd)
        self.path = path

    def writable(self, offset: int, nbytes: int) -> memoryview:
        return self.buf[offset:offset + nbytes]

    def readonly(self, offset: int, nbytes: int) -> memoryview:
        return self.buf[offset:offset + nbytes].toreadonly()

    def close(self) -> None:
        """Unmaps (once every exported view is gone) and removes the shm file."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        self.buf.release()
        try:
            self._mmap.close()
        except BufferError:
            # A caller still holds a lease view; the mapping goes when the last view does.
            log.warning("DRAM arena closed while views are still held; unmapping when they are released")
