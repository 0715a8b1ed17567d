"""What the GPU data path needs from a client (``GpuSession``), taken from either front end.

The GPU path (``gpu_store``, ``gpu_retrieve``) runs blocking on its caller's thread (a worker
thread under the async client) and pipelines RPCs with ``.future()`` calls, so it needs sync
stubs: the sync client's own, or, for ``AsyncKVStoreClient``, stubs on a second, blocking
channel to the same daemon with the same credentials (``AsyncKVStoreClient._blocking_stubs``).
Session state (namespace, arena mapping, nonce, HBM pool export) is read live from the
client core, so a re-attach by the core (daemon restart) is seen here at once.

Threading: every method may be called from any thread; ``arena_changed`` is set, never
cleared, by the thread that saw the mismatch (the route then lets the core re-attach).
"""

from __future__ import annotations

from typing import Any, Sequence

from kvstore_wire._proto.kvstore.v1 import local_pb2


class GpuSession:
    def __init__(self, core, stubs: dict, metadata, timeout_s: float | None) -> None:
        self._core = core
        self._metadata = metadata
        self.timeout_s = timeout_s
        self._reserve = stubs["reserve"]
        self._lease_read = stubs["lease_read"]
        self._commit = stubs["commit"]
        self._release = stubs["release"]
        #: A response carried another arena's nonce (the daemon restarted): the core must
        #: re-attach before this session's offsets are valid again.
        self.arena_changed = False

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

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        return self._core.keys(tokens)

    # ---- leases
    def _same_arena(self, nonce: bytes) -> bool:
        same = bool(nonce) and nonce == self._core.nonce
        if not same:
            self.arena_changed = True
        return same

    def _release_later(self, lease_id: int) -> None:
        """Ends a lease without waiting for the answer (it expires on the daemon otherwise)."""
        if lease_id:
            self._release.future(local_pb2.ReleaseRequest(lease_ids=[lease_id]), metadata=self._metadata,
                                 timeout=self.timeout_s)
