"""``RemoteLevel``: the remote tier's parts as one level of the tier chain.

The chain sees a ``Tier`` with the ``fetch_prefix`` capability (``base.PrefixSource``):

- ``fetch_prefix(cids)``: on a local miss the chain asks for the longest cached prefix of
  the missing ids in one pipelined round trip, fetched concurrently, verified and decoded to
  RAW (``RemoteReader``); the chain promotes what comes back into the levels above.
- ``put``: hands a copy to the bounded upload queue (``RemoteUploader.submit``, skipped and
  counted when full) and returns at once, so the link into this level is write-through
  (the uploader is its queue). A chunk this level just fetched (promoted, then written
  down the chain again) is not uploaded back.
- ``get``: one chunk through the same read path (a ``get`` walk that reached this level).
- ``contains``: False. The chain calls it on the event loop (``lookup``) and before every
  put; a network round trip there would block both. Remote presence is only asked through
  ``fetch_prefix``, from a worker thread.
- ``scan``: nothing (the remote holds every replica's chunks; listing them at start-up or in
  ``kvctl ls`` would walk the whole cluster). ``delete`` reaches Redis.
- ``delete_prefix``: a namespace clear (``kvctl clear``, Admin Clear, a tenant's deletion)
  removes the namespace's values from Redis for every replica: a SCAN by the namespace's
  salted key pattern on every master, then a pipelined delete (bounded by the admin
  deadline, ``ADMIN_DEADLINE_FACTOR`` x ``remote.timeout_ms``). The chain calls it instead
  of scanning this level. Only whole namespaces (a prefix of at least a namespace id) are
  walked; a shorter prefix (the whole store) removes nothing here, since it would delete
  every tenant's values of the deployment.

Never raises for a remote failure: a slow, partitioned or down cluster is a miss (or a
skipped upload) within ``remote.timeout_ms``, counted in the remote stats.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Iterator, Sequence

from ...types import ChunkId, ChunkMeta, Medium, split_chunk_id
from .keys import NAMESPACE_ID_BYTES
from ..base import ChunkRef, EntryInfo, Fetched, Tier, TierStats
from .wiring import RemoteParts

#: Chunks remembered as fetched from the remote (not uploaded back when the chain writes them
#: down again after promoting them): a few prefixes' worth.
RECENT_FETCHES = 4096

#: Namespace id -> tokens per chunk (the namespace registry); None when unknown.
ChunkTokens = Callable[[bytes], "int | None"]


class RemoteLevel(Tier):
    medium = Medium.REMOTE
    serves_prefixes = True

    def __init__(self, parts: RemoteParts, chunk_tokens: ChunkTokens | None = None) -> None:
        self.parts = parts
        self._chunk_tokens = chunk_tokens
        self._lock = threading.Lock()   # guards _recent (a leaf lock)
        self._recent: OrderedDict[ChunkId, None] = OrderedDict()

    # The listener belongs to the inner tier, which reports stores and deletes.
    @property
    def listener(self):
        return self.parts.tier.listener

    @listener.setter
    def listener(self, fn) -> None:
        self.parts.tier.listener = fn

    def _tokens(self, cid: ChunkId) -> int | None:
        return None if self._chunk_tokens is None else self._chunk_tokens(split_chunk_id(cid)[0])

    # -- the chain's batch capability -------------------------------------------------------
    def fetch_prefix(self, cids: Sequence[ChunkId]) -> list[Fetched]:
        if not cids:
            return []
        got = self.parts.reader.fetch_prefix(list(cids), self._tokens(cids[0]))
        with self._lock:
            for f in got:
                self._recent[f.cid] = None
                self._recent.move_to_end(f.cid)
            while len(self._recent) > RECENT_FETCHES:
                self._recent.popitem(last=False)
        return [Fetched(f.cid, f.meta, f.payload) for f in got]

    # -- Tier -------------------------------------------------------------------------------
    def get(self, cid: ChunkId) -> ChunkRef | None:
        got = self.fetch_prefix([cid])
        if not got:
            return None
        f = got[0]
        return ChunkRef(f.cid, f.meta, memoryview(f.payload).cast("B"), Medium.REMOTE)

    def put(self, cid: ChunkId, meta: ChunkMeta, payload) -> bool:
        """Queues the upload (a copy); False when the queue was full (counted) or the chunk
        came from here."""
        with self._lock:
            if cid in self._recent:
                return False
        return self.parts.uploader.submit(cid, meta, payload)

    def contains(self, cid: ChunkId) -> bool:
        return False

    def delete(self, cid: ChunkId) -> bool:
        return self.parts.tier.delete(cid)

    def delete_many(self, cids) -> int:
        return self.parts.tier.delete_many(cids)

    def delete_prefix(self, prefix: bytes) -> int:
        """Removes the values of the namespace(s) under ``prefix`` from Redis; returns how
        many chunks went. A prefix shorter than a namespace id removes nothing (0)."""
        if len(prefix) < NAMESPACE_ID_BYTES:
            return 0
        with self._lock:
            for cid in [c for c in self._recent if c.startswith(prefix)]:
                del self._recent[cid]
        return self.parts.tier.delete_prefix(prefix)

    def evict(self, nbytes: int) -> list[ChunkId]:
        return []

    def scan(self, prefix: bytes = b"", after: bytes = b"", limit: int = 0) -> Iterator[EntryInfo]:
        return iter(())

    def stats(self) -> TierStats:
        return self.parts.tier.stats()

    def flush(self, timeout_s: float) -> bool:
        """Waits for the upload queue to drain (tests, benchmarks); False on timeout."""
        return self.parts.uploader.flush(timeout_s)

    def close(self) -> None:
        self.parts.close()
