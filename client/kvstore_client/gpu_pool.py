"""Arena extents reserved ahead of the GPU path's stores (write-ahead reservations).

A store through keyed reservations costs two round trips around its copies: ReserveWrite
(the daemon picks and clears extents for the keys) and CommitWrite. With unbound reservations
(``AttachResponse.unbound_reservations``) the client keeps a few leases of extents for chunks
of its namespace's size reserved before it needs them, without keys; a store copies into them
at once and names the keys in its CommitWrite (``Binding``, always with ``keep_lease``: the
daemon takes the bound slots out of the lease at once, so commits of one lease from several
stores run concurrently, and it ends the lease when its last slot is bound), which it can
also leave to a helper thread (``store_cuda(wait=False)``). The pool is refilled in the
background, off the store's path.

Bounds: the pool holds at most ``target_bytes`` (``GpuPath.write_ahead_bytes``, at most a
sixteenth of the arena), counted by the daemon as this tenant's reserved bytes and open
reservations like any reservation; a refill the daemon refuses (quota, no room) is retried no
sooner than ``REFUSED_BACKOFF_S`` later, and stores then reserve keyed, as without a pool.
A lease is used only while it has ``EXPIRY_MARGIN_S`` left (CommitWrite with ``keep_lease``
renews it); one near its expiry, or of an earlier daemon (another arena nonce), is released.

Threading: every method may be called from any thread (the store's, a commit helper's, a gRPC
callback's); ``_lock`` guards the ready leases and the refills in flight (a leaf lock).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvstore_wire._proto.kvstore.v1 import local_pb2
from kvstore_wire.types import Encoding, KeyKind

from .errors import is_exhausted

log = logging.getLogger(__name__)

#: A refill refused by the daemon (RESOURCE_EXHAUSTED or another error) is not retried sooner.
REFUSED_BACKOFF_S = 1.0
#: A lease is taken for a store only while it has at least this long (or a quarter of the
#: lease TTL, if less) before it expires.
EXPIRY_MARGIN_S = 5.0
#: A refill reservation holds at least this many bytes (one CommitWrite per lease: leases
#: large enough that their copies outlast a round trip).
MIN_LEASE_BYTES = 64 << 20


@dataclass(eq=False)
class PoolLease:
    """One unbound reservation: its lease id, the arena it is in, and its slots not yet used."""

    lease_id: int
    nonce: bytes
    expires_s: float
    free: list = field(default_factory=list)   # local_pb2.Slot
    #: CommitWrites of its slots submitted and not yet answered.
    inflight: int = 0
    #: No more of its slots are used: released once ``inflight`` drops to 0.
    retired: bool = False


class WritePool:
    """Unbound reservations for chunks of ``size`` bytes, ready for stores of one session."""

    def __init__(self, session, size: int, target_bytes: int) -> None:
        self._s = session
        self.size = size
        #: The arena this pool's leases are in (a new one, after a daemon restart, gets a new pool).
        self.nonce = session.arena_nonce
        self.target_chunks = max(0, target_bytes // size)
        self.lease_chunks = self._lease_chunks(0)
        self._ready: list[PoolLease] = []
        self._inflight: dict[Any, int] = {}     # refill future -> chunks asked for
        self._quiet_until = 0.0
        self._closed = False
        self._lock = threading.Lock()
        #: Counters (benchmarks, tests): slots handed out, refills asked for, refills refused.
        self.taken_slots = 0
        self.refills = 0
        self.refused = 0

    # ---- what a store takes
    def take(self, n: int) -> list[tuple[PoolLease, list]]:
        """Up to ``n`` slots from ready leases, oldest lease first: ``[(lease, slots)]``. A
        lease stays ready while it has slots left (its slots may be bound by concurrent
        commits)."""
        now = time.time()
        margin = min(EXPIRY_MARGIN_S, self._s.lease_ttl_s / 4)
        nonce = self._s.arena_nonce
        out: list[tuple[PoolLease, list]] = []
        with self._lock:
            stale = [le for le in self._ready if le.nonce != nonce or le.expires_s - now < margin]
            self._ready = [le for le in self._ready if le not in stale]
            while n > 0 and self._ready:
                le = self._ready[0]
                k = min(n, len(le.free))
                out.append((le, le.free[:k]))
                le.free = le.free[k:]
                if not le.free:
                    self._ready.pop(0)
                n -= k
                self.taken_slots += k
        for le in stale:
            self.retire(le)
        return out

    def note_call(self, chunks: int) -> None:
        """Sizes the next refills' leases like this store (at least ``MIN_LEASE_BYTES``, at
        most the target)."""
        if chunks > 0 and self.target_chunks:
            self.lease_chunks = self._lease_chunks(chunks)

    def _lease_chunks(self, chunks: int) -> int:
        return max(1, min(max(chunks, -(-MIN_LEASE_BYTES // self.size)), self.target_chunks))

    def reserve(self, n: int):
        """An unbound ReserveWrite of ``n`` chunks (a future of its answer): a refill, or the
        part of a store the pool did not cover."""
        return self._s._reserve.future(self._request(n), metadata=self._s._metadata, timeout=self._s.timeout_s)

    def lease_of(self, resp) -> PoolLease:
        return PoolLease(resp.lease_id, resp.arena_nonce, resp.expires_unix_s, list(resp.slots))

    def begin(self, lease: PoolLease) -> None:
        """A CommitWrite of some of ``lease``'s slots is on its way."""
        with self._lock:
            lease.inflight += 1

    def end(self, lease: PoolLease, renewed_until: float | None) -> None:
        """That CommitWrite was answered: the lease renewed until ``renewed_until`` (None: it
        failed, and the daemon ended the lease)."""
        with self._lock:
            lease.inflight -= 1
            if renewed_until is None:
                lease.free = []
                if lease in self._ready:
                    self._ready.remove(lease)
            else:
                lease.expires_s = max(lease.expires_s, renewed_until)
            release = lease.retired and lease.inflight == 0 and renewed_until is not None
        if release:
            self._s._release_later(lease.lease_id)

    def retire(self, lease: PoolLease) -> None:
        """No more of ``lease``'s slots are used (a store failed while holding some, or it is
        near its expiry): released once its commits in flight are answered."""
        with self._lock:
            if lease in self._ready:
                self._ready.remove(lease)
            lease.free = []
            lease.retired = True
            now = lease.inflight == 0
        if now:
            self._s._release_later(lease.lease_id)

    # ---- background
    def refill(self) -> None:
        """Asks for leases until the ready and in-flight slots reach ``target_chunks`` (each
        answer is added when it comes; nothing here waits)."""
        if not self.target_chunks:
            return
        while True:
            with self._lock:
                if self._closed or time.monotonic() < self._quiet_until:
                    return
                have = sum(len(le.free) for le in self._ready) + sum(self._inflight.values())
                want = min(self.lease_chunks, self.target_chunks - have)
                if want < self.lease_chunks and have:
                    return
                if want <= 0:
                    return
                fut = self.reserve(want)
                self._inflight[fut] = want
                self.refills += 1
            fut.add_done_callback(self._refilled)

    def _refilled(self, fut) -> None:
        with self._lock:
            self._inflight.pop(fut, None)
            closed = self._closed
        try:
            resp = fut.result()
        except grpc.RpcError as e:
            with self._lock:
                self._quiet_until = time.monotonic() + REFUSED_BACKOFF_S
                self.refused += 1
            if not is_exhausted(e):
                log.info("reserving arena extents ahead of stores failed (%s); stores reserve as they go", e)
            return
        except Exception as e:  # noqa: BLE001 - cancelled at close; nothing was granted
            log.debug("write-ahead reservation ended: %s", e)
            return
        if not resp.lease_id:
            return
        if closed or resp.arena_nonce != self._s.arena_nonce:
            self._s._release_later(resp.lease_id)
            return
        with self._lock:
            if not self._closed:
                self._ready.append(self.lease_of(resp))
                return
        self._s._release_later(resp.lease_id)

    def drain(self, quiet_s: float = REFUSED_BACKOFF_S) -> None:
        """Gives back every ready lease (the daemon refused a store's reservation: the room
        the pool holds goes back first) and pauses refills for ``quiet_s``."""
        with self._lock:
            ready = list(self._ready)
            self._quiet_until = time.monotonic() + quiet_s
        for le in ready:
            self.retire(le)

    def ready_slots(self) -> int:
        with self._lock:
            return sum(len(le.free) for le in self._ready)

    def close(self) -> None:
        """Gives back the ready leases; answers still in flight are released as they come."""
        with self._lock:
            self._closed = True
            ready = list(self._ready)
        for le in ready:
            self.retire(le)

    def _request(self, n: int):
        s = self._s
        return local_pb2.ReserveWriteRequest(namespace_id=s.namespace_id, chunks=[
            local_pb2.ChunkToWrite(key_kind=KeyKind.PREFIX, num_tokens=s.namespace.chunk_tokens, encoding=Encoding.RAW,
                                   payload_bytes=self.size) for _ in range(n)])
