"""Background and on-demand verification of the disk tier's chunk files.

Every disk read already verifies a chunk, so damage to a *hot* chunk is found when it is
read. The scrubber finds damage to *cold* chunks (bit rot, outside writes) before a reader
needs them: it walks the chunks coldest first at ``disk.scrub_bytes_per_s`` and lets
``DiskTier.verify`` delete any chunk whose header or CRC32C fails (counted in ``corrupt``).
A pass skips chunks read since the previous pass began (the read verified them).

``scrub_all`` is the on-demand form (``kvctl verify``): every chunk, as fast as the disk goes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import KVStoreError

if TYPE_CHECKING:
    from .disk import DiskTier

log = logging.getLogger(__name__)

#: Seconds after start before the first background pass (start-up I/O goes first).
FIRST_PASS_DELAY_S = 60.0
#: Seconds of rest between two background passes.
PASS_REST_S = 60.0
#: Longest single sleep of the rate limiter, so ``stop`` is prompt.
_MAX_SLEEP_S = 1.0
#: How often (in chunks) ``scrub_all`` reports progress.
PROGRESS_EVERY_CHUNKS = 64


@dataclass(slots=True)
class ScrubReport:
    total: int = 0          #: chunks to check in this run
    checked: int = 0        #: chunks checked so far
    corrupt: int = 0        #: chunks that failed and were removed
    bytes_checked: int = 0  #: file bytes read
    seconds: float = 0.0
    done: bool = False


def scrub_all(disk: "DiskTier", progress: Callable[[ScrubReport], None] | None = None) -> ScrubReport:
    """Verifies every chunk stored when the call starts; chunks removed meanwhile are skipped."""
    ids = disk.cold_ids()
    r = ScrubReport(total=len(ids))
    t0 = time.monotonic()
    for i, cid in enumerate(ids):
        res = disk.verify(cid)
        r.checked = i + 1
        if res is not None:
            ok, n = res
            r.bytes_checked += n
            r.corrupt += not ok
        if progress is not None and r.checked % PROGRESS_EVERY_CHUNKS == 0:
            r.seconds = time.monotonic() - t0
            progress(r)
    r.seconds, r.done = time.monotonic() - t0, True
    if progress is not None:
        progress(r)
    log.info("disk verify: %d chunks (%d bytes) checked in %.1fs, %d corrupt removed",
             r.checked, r.bytes_checked, r.seconds, r.corrupt)
    return r


class Scrubber:
    """A daemon thread verifying cold chunks at ``bytes_per_s``. ``stop`` ends it within a second."""

    def __init__(self, disk: "DiskTier", bytes_per_s: int, clock: Callable[[], float] = time.time, *,
                 first_delay_s: float = FIRST_PASS_DELAY_S, rest_s: float = PASS_REST_S) -> None:
        self._disk, self._rate, self._clock = disk, bytes_per_s, clock
        self._first, self._rest = first_delay_s, rest_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvstore-disk-scrubber", daemon=True)
        self.passes = 0
        self.corrupt = 0
        self.bytes_checked = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sleep(self, seconds: float) -> bool:
        """Sleeps in short steps; False once stopped."""
        end = time.monotonic() + seconds
        while not self._stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return True
            self._stop.wait(min(left, _MAX_SLEEP_S))
        return False

    def _run(self) -> None:
        if not self._sleep(self._first):
            return
        since = float("inf")
        while not self._stop.is_set():
            started = self._clock()
            try:
                self._pass(since)
            except KVStoreError as e:   # a failing disk: say so, try again next pass
                log.error("disk scrub pass stopped: %s", e)
            since = started
            self.passes += 1
            if not self._sleep(self._rest):
                return

    def _pass(self, accessed_before_s: float) -> None:
        corrupt0 = self.corrupt
        for cid in self._disk.cold_ids(accessed_before_s):
            if self._stop.is_set():
                return
            res = self._disk.verify(cid)
            if res is None:
                continue
            ok, n = res
            self.bytes_checked += n
            if not ok:
                self.corrupt += 1
            if not self._sleep(n / self._rate):
                return
        if self.corrupt > corrupt0:
            log.warning("disk scrub pass found %d corrupt chunks (removed)", self.corrupt - corrupt0)
