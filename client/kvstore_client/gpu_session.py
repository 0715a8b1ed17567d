"""What the GPU data path needs from a client (``GpuSession``), taken from either front end.

The GPU path (``gpu_store``, ``gpu_retrieve``) runs blocking on its caller's thread (a worker
thread under the async client) and pipelines RPCs with ``.future()`` calls, so it needs sync
stubs: the sync client's own, or, for ``AsyncKVStoreClient``, stubs on a second, blocking
channel to the same daemon with the same credentials (``AsyncKVStoreClient._blocking_stubs``).
Session state (namespace, arena mapping, nonce, HBM pool export) is read live from the
client core, so a re-attach by the core (daemon restart) is seen here at once.

Threading: every method may be called from any thread; ``arena_changed`` is set by the
thread that saw the mismatch and cleared by the route once the core re-attached.
``_releasing_lock`` guards the set of release calls in flight (a leaf lock).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

from kvstore_wire._proto.kvstore.v1 import local_pb2

from ._control import with_control

log = logging.getLogger(__name__)

#: Keys per touch-only LeaseRead (well below the daemon's ``server.max_keys_per_request``,
#: 4096 by default).
TOUCH_BATCH = 256


class GpuSession:
    def __init__(self, core, stubs: dict, metadata, timeout_s: float | None) -> None:
        self._core = core
        stubs = with_control(core, stubs)    # over the daemon's control socket while it is open
        self._metadata = metadata
        self.timeout_s = timeout_s
        self._reserve = stubs["reserve"]
        self._lease_read = stubs["lease_read"]
        self._commit = stubs["commit"]
        self._release = stubs["release"]
        #: A response carried another arena's nonce (the daemon restarted): the core must
        #: re-attach before this session's offsets are valid again.
        self.arena_changed = False
        # Release calls in flight: a gRPC future that is garbage-collected cancels its call,
        # so each is held here until it completes (else the lease lives until its TTL).
        self._releasing: set = set()
        self._releasing_lock = threading.Lock()

    @classmethod
    def of(cls, client) -> "GpuSession":
        """The session of a ``KVStoreClient`` or ``AsyncKVStoreClient`` (or a session itself)."""
        if isinstance(client, GpuSession):
            return client
        blocking = getattr(client, "_blocking_stubs", None)
        stubs = blocking() if blocking is not None else client._rpc
        return cls(client._core, stubs, client._metadata, client.timeout_s)

    # ---- session state, live from the core
    @property
    def namespace(self):
        return self._core.namespace

    @property
    def namespace_id(self) -> bytes:
        return self._core.namespace_id

    @property
    def arena(self):
        return self._core.arena

    @property
    def hbm(self) -> Any:
        """``AttachResponse.hbm`` (the daemon's HBM pool export), or None without one."""
        return getattr(self._core, "hbm", None)

    @property
    def presence(self) -> Any:
        """The daemon's presence index, mapped (``PresenceReader``), or None without one."""
        return getattr(self._core, "presence", None)

    @property
    def arena_nonce(self) -> bytes:
        return self._core.nonce

    @property
    def lease_ttl_s(self) -> float:
        return getattr(self._core, "lease_ttl_s", 30.0)

    @property
    def unbound_reservations(self) -> bool:
        """The daemon takes unbound reservations (write-ahead stores, ``gpu_pool``)."""
        return bool(getattr(self._core, "unbound_reservations", False))

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        return self._core.keys(tokens)

    # ---- leases
    def _same_arena(self, nonce: bytes) -> bool:
        same = bool(nonce) and nonce == self._core.nonce
        if not same:
            self.arena_changed = True
        return same

    def _release_later(self, *lease_ids: int) -> None:
        """Ends leases (one Release RPC) without waiting for the answer (they expire on the
        daemon otherwise)."""
        ids = [lid for lid in lease_ids if lid]
        if not ids:
            return
        self._keep(self._release.future(local_pb2.ReleaseRequest(lease_ids=ids), metadata=self._metadata,
                                        timeout=self.timeout_s))

    def _touch_later(self, keys: Sequence[bytes]) -> None:
        """Reports chunks read without a lease (``LeaseReadRequest.touch_only``: counted as
        hits, their recency refreshed) without waiting for the answer; one RPC per
        ``TOUCH_BATCH`` keys."""
        for lo in range(0, len(keys), TOUCH_BATCH):
            self._keep(self._lease_read.future(
                local_pb2.LeaseReadRequest(namespace_id=self.namespace_id, keys=list(keys[lo:lo + TOUCH_BATCH]),
                                           touch_only=True),
                metadata=self._metadata, timeout=self.timeout_s))

    def _keep(self, fut) -> None:
        """Holds a call that is not waited for until it completes (``drain`` waits for it)."""
        with self._releasing_lock:
            self._releasing.add(fut)
        fut.add_done_callback(self._released)

    def _released(self, fut) -> None:
        with self._releasing_lock:
            self._releasing.discard(fut)
        if fut.cancelled() or fut.exception() is not None:
            log.info("releasing a lease or reporting lease-free reads failed (%s); a lease expires on the "
                     "daemon by itself", "cancelled" if fut.cancelled() else fut.exception())

    def drain(self, timeout_s: float | None = None) -> None:
        """Waits for the release and touch calls in flight (before the channel closes)."""
        with self._releasing_lock:
            pending = list(self._releasing)
        for f in pending:
            try:
                f.result(timeout=timeout_s)
            except Exception:  # noqa: BLE001 - logged by _released; the lease expires by itself
                pass
