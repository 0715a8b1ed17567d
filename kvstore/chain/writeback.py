"""``WriteBehind``: the bounded queue and writer thread of one write-behind link.

``submit(cid)`` takes a read lease on the chunk in the upper tier (``Tier.peek``: eviction
cannot pull the bytes away before the writer copies them) and queues it; one writer thread
hands each queued lease to ``write(cid, ref)`` and releases it. The queue is bounded twice:

- ``max_chunks`` entries (``disk.write_queue_chunks``);
- ``max_bytes`` of leased payload (``chain.write_behind_fraction`` of the upper tier), so
  leases held for the queue can never take the whole arena away from foreground puts.

A submit that would exceed either bound skips the lower-tier copy and counts it in
``dropped`` (the chunk stays in the upper tier); it never blocks or fails the put. When the
upper tier cannot make room for a foreground write, the chain calls ``shed``: every queued
copy not yet started gives its lease back (skipped and counted the same way), so queued
copies never make a put fail.

A delete cancels the queued copies of its chunks and waits (``CANCEL_WAIT_S`` at most) for a
copy of one of them that the writer is in the middle of: otherwise that copy could land in the
lower tier after the delete removed the chunk there, and a deleted chunk would be read again.

Lock order: ``WriteBehind._lock`` -> tier locks (``peek`` is called outside it). ``_lock``
guards the counters and ``_queued``; it is never held during I/O or while waiting.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from ..domain.errors import DeadlineExceeded
from ..domain.types import ChunkId
from ..tiers.base import ChunkRef, Tier

log = logging.getLogger(__name__)

#: Default of ``chain.write_behind_fraction``: most of the upper tier's capacity the queued
#: leases may hold. Half leaves the other half to foreground writes and readers even when the
#: lower tier stalls completely (and ``shed`` gives it back under pressure).
WRITE_BEHIND_SOURCE_FRACTION = 0.5
#: How long a delete waits for an in-progress lower-tier copy of its chunk (seconds).
CANCEL_WAIT_S = 30.0
#: How long the writer thread gets to exit after the queue is settled (seconds).
WRITER_JOIN_TIMEOUT_S = 10.0


class _Write:
    """One queued write; ``cancelled`` is set by a delete before the writer reaches it."""

    __slots__ = ("cid", "ref", "nbytes", "cancelled", "started", "shed")

    def __init__(self, cid: ChunkId, ref: ChunkRef) -> None:
        self.cid = cid
        self.ref = ref
        self.nbytes = ref.view.nbytes
        self.cancelled = False
        #: The writer took it (``shed`` leaves it alone from then on).
        self.started = False
        #: ``shed`` gave its lease back (and took its bytes off ``_queued_bytes``).
        self.shed = False


class WriteBehind:
    """Thread-safe. ``write`` runs on the writer thread and must handle its own errors
    (the chain counts them); an exception escaping it is logged and the writer goes on."""

    def __init__(self, source: Tier, write: Callable[[ChunkId, ChunkRef], None], max_chunks: int,
                 max_bytes: int, name: str) -> None:
        self._source = source
        self._write = write
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)   # notified when the writer finishes a copy
        self._writing: _Write | None = None   # the copy the writer is in the middle of
        self._queue: queue.Queue[_Write | None] = queue.Queue(maxsize=max_chunks)
        self._queued: dict[ChunkId, list[_Write]] = {}
        self._queued_bytes = 0
        self.dropped = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, cid: ChunkId) -> bool:
        """Queues the copy of ``cid`` from the upper tier; False (counted) when it was skipped."""
        ref = self._source.peek(cid)
        if ref is None:             # evicted already by a concurrent put: nothing left to copy
            with self._lock:
                self.dropped += 1
            return False
        w = _Write(cid, ref)
        with self._lock:
            if not self._closed and self._queued_bytes + w.nbytes <= self._max_bytes:
                try:
                    self._queue.put_nowait(w)
                except queue.Full:
                    pass
                else:
                    self._queued.setdefault(cid, []).append(w)
                    self._queued_bytes += w.nbytes
                    return True
            self.dropped += 1
        ref.release()
        return False

    @property
    def queued_bytes(self) -> int:
        """Payload bytes the queue's leases hold in the upper tier."""
        with self._lock:
            return self._queued_bytes

    def shed(self) -> int:
        """Gives back the lease of every queued copy the writer has not started: those
        lower-tier copies are skipped and counted in ``dropped`` (the chunks stay in the upper
        tier, where eviction may now take them). Returns the payload bytes released."""
        shed: list[_Write] = []
        with self._lock:
            for ws in self._queued.values():
                for w in ws:
                    if not w.started and not w.cancelled:
                        w.cancelled = w.shed = True
                        shed.append(w)
            freed = sum(w.nbytes for w in shed)
            self._queued_bytes -= freed
            self.dropped += len(shed)
        for w in shed:
            w.ref.release()         # the writer skips it and does not release it again
        if shed:
            log.info("write-behind gave back %d queued copies (%d bytes) to make room for foreground writes; "
                     "their lower-tier copies are skipped", len(shed), freed)
        return freed

    def cancel(self, match: Callable[[ChunkId], bool], wait: bool = True) -> None:
        """Queued copies of matching ids are skipped when the writer reaches them; with
        ``wait``, a matching copy in progress is waited for (``CANCEL_WAIT_S`` at most), so
        that the caller's delete of the lower tier comes after it."""
        with self._lock:
            for cid, ws in self._queued.items():
                if match(cid):
                    for w in ws:
                        w.cancelled = True
            if not wait or threading.current_thread() is self._thread:
                return
            deadline = time.monotonic() + CANCEL_WAIT_S
            while self._writing is not None and match(self._writing.cid):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("a delete of %s did not wait for its write-behind copy in progress (over %s s): "
                              "the copy may outlive the delete in the lower tier", self._writing.cid.hex(),
                              CANCEL_WAIT_S)
                    return
                self._idle.wait(left)

    def _loop(self) -> None:
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
                    w.started = True
                    if not cancelled:
                        self._writing = w
                if not cancelled:
                    try:
                        self._write(w.cid, w.ref)
                    except Exception:  # noqa: BLE001 - the writer thread must outlive any one bad write
                        log.exception("write-behind of %s failed with an unexpected error", w.cid.hex())
            finally:
                if w is not None:
                    with self._lock:
                        if self._writing is w:
                            self._writing = None
                            self._idle.notify_all()
                        mine = not w.shed       # a shed write's lease is released by ``shed``
                        if mine:
                            self._queued_bytes -= w.nbytes
                    if mine:
                        w.ref.release()
                self._queue.task_done()

    def flush(self, timeout_s: float | None = None) -> None:
        """Waits until every queued write has been attempted; DeadlineExceeded on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DeadlineExceeded(f"{self._queue.unfinished_tasks} write-behind copies still queued after "
                                           f"{timeout_s} s; the lower tier is slower than the write rate")
                self._queue.all_tasks_done.wait(left)

    def close(self, drain_timeout_s: float) -> None:
        """Drains the queue (up to ``drain_timeout_s``, then cancels the rest) and stops the
        writer. Later submits are dropped. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.flush(drain_timeout_s)
        except DeadlineExceeded as err:
            log.error("closing with unwritten chunks: %s", err)
            self.cancel(lambda c: True, wait=False)
        self._queue.put(None)
        self._thread.join(WRITER_JOIN_TIMEOUT_S)
        if self._thread.is_alive():
            log.error("write-behind thread %s did not stop within %s s", self._thread.name, WRITER_JOIN_TIMEOUT_S)
