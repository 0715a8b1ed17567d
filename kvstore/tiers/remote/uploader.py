"""``RemoteUploader``: the write path to the remote tier, off the request path.

``submit`` (any thread, never blocks) copies the chunk into a bounded queue; when the queue is
full the upload is skipped and counted (the chunk stays local, like the disk write-behind).
One thread drains the queue in batches of ``remote.upload_batch_chunks``: one existence
check per batch (a pipelined STRLEN), then only the missing chunks are encoded at the level
the adaptive controller picks (plus the small companion copy when enabled) and stored.

Failure: when the cluster is unreachable the batch goes back to the head of the queue and the
thread waits ``remote.retry_backoff_s`` before retrying, so uploads resume once Redis
recovers; chunks that arrive meanwhile still obey the queue bound. Nothing here raises to the
submitter.

Lock order: ``_cond`` guards the queue and counters; the thread releases it before any
Redis call or encode.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from ...config import RemoteConfig, TierCodec
from ...errors import KVStoreError
from ...types import ChunkId, ChunkMeta, Encoding, split_chunk_id
from .adaptive import AdaptiveController
from .tier import RemoteTier, StoreOutcome

log = logging.getLogger(__name__)

#: ``(cid, meta, payload, level) -> (meta, payload)``: encodes a RAW chunk at a codec level
#: (``kvstore.tiers.transcode.Transcoder.encode``). It may return the chunk unchanged (still
#: RAW) for a namespace the codec cannot handle.
Encoder = Callable[[ChunkId, ChunkMeta, object, TierCodec], tuple[ChunkMeta, object]]


@dataclass(slots=True)
class UploaderStats:
    queued: int = 0
    submitted: int = 0
    skipped_queue_full: int = 0
    uploaded: int = 0
    deduplicated: int = 0
    over_quota: int = 0
    retried_batches: int = 0
    encode_errors: int = 0
    dropped_on_error: int = 0


class RemoteUploader:
    def __init__(self, tier: RemoteTier, controller: AdaptiveController, encode: Encoder | None,
                 cfg: RemoteConfig) -> None:
        self.tier, self.controller, self._encode, self.cfg = tier, controller, encode, cfg
        self._queue: deque[tuple[ChunkId, ChunkMeta, bytes]] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._s = UploaderStats()
        self._thread = threading.Thread(target=self._run, name="kvstore-remote-upload", daemon=True)
        self._thread.start()

    def submit(self, cid: ChunkId, meta: ChunkMeta, payload) -> bool:
        """Queues a copy of the chunk for upload; False (counted) when the queue is full."""
        with self._cond:
            self._s.submitted += 1
            if self._closed or len(self._queue) >= self.cfg.upload_queue_chunks:
                self._s.skipped_queue_full += 1
                return False
            self._queue.append((cid, meta, bytes(payload)))
            self._cond.notify()
            return True

    def flush(self, timeout_s: float) -> bool:
        """Waits until the queue is drained and no batch is in flight; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout_s)

    def stats(self) -> UploaderStats:
        with self._cond:
            s = UploaderStats(**{f: getattr(self._s, f) for f in UploaderStats.__slots__})
            s.queued = len(self._queue)
            return s

    def close(self) -> None:
        """Stops the thread; chunks still queued are dropped (they stay local)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(self.cfg.retry_backoff_s + 2 * self.tier.link.timeout_s + 1.0)

    # -- thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.cfg.upload_batch_chunks))]
                self._busy = True
            try:
                left = self._upload(batch)
            except Exception:  # noqa: BLE001 - a bug must not kill the upload thread for good
                log.exception("remote upload batch of %d chunks failed unexpectedly; dropped (they stay local)",
                              len(batch))
                with self._cond:
                    self._s.dropped_on_error += len(batch)
                left = []
            if left:
                with self._cond:
                    self._s.retried_batches += 1
                    room = max(0, self.cfg.upload_queue_chunks - len(self._queue))
                    self._s.skipped_queue_full += max(0, len(left) - room)
                    self._queue.extendleft(reversed(left[:room]))
                    self._cond.wait_for(lambda: self._closed, self.cfg.retry_backoff_s)

    def _upload(self, batch: list[tuple[ChunkId, ChunkMeta, bytes]]) -> list:
        """Uploads what is missing; returns the chunks to retry (the cluster failed)."""
        sizes = self.tier.sizes([cid for cid, _, _ in batch])
        if sizes is None:
            return batch
        missing = [item for item, n in zip(batch, sizes) if not n]
        with self._cond:
            self._s.deduplicated += len(batch) - len(missing)
        for i, (cid, meta, payload) in enumerate(missing):
            outcome = self._store_one(cid, meta, payload)
            if outcome is StoreOutcome.FAILED:
                return missing[i:]
            with self._cond:
                if outcome is StoreOutcome.STORED:
                    self._s.uploaded += 1
                elif outcome is StoreOutcome.EXISTS:
                    self._s.deduplicated += 1
                else:
                    self._s.over_quota += 1
        return []

    def _store_one(self, cid: ChunkId, meta: ChunkMeta, payload: bytes) -> StoreOutcome:
        if meta.encoding != Encoding.RAW or self._encode is None:
            return self.tier.store(cid, meta, payload)  # a client's bitstream, or no codec: as given
        ns = split_chunk_id(cid)[0]
        self.controller.calibrate_once(cid, meta, payload)  # the first RAW chunk only
        level = self.controller.choose(ns, meta.num_tokens, meta.payload_bytes, "upload").level
        primary = self._encoded(cid, meta, payload, level)
        if primary is None or primary[0].encoding == Encoding.RAW:  # no codec for it: store RAW
            return self.tier.store(cid, meta, payload)
        small = None
        small_level = self.controller.small_level(ns)
        if self.cfg.small_companion and small_level != level:
            enc = self._encoded(cid, meta, payload, small_level)
            small = (enc[0], enc[1], small_level) if enc is not None else None
        return self.tier.store(cid, primary[0], primary[1], level, small)

    def _encoded(self, cid: ChunkId, meta: ChunkMeta, payload: bytes, level: TierCodec):
        """``(meta, bitstream)``, or None (counted) when the codec cannot take this chunk:
        a shape or dtype it refuses, an unknown namespace, or a build without the codec."""
        try:
            emeta, data = self._encode(cid, meta, payload, level)
        except (ValueError, KVStoreError) as e:
            with self._cond:
                self._s.encode_errors += 1
            log.warning("remote upload of chunk %s cannot encode at %s (%s); storing it as given",
                        cid.hex()[:16], level.value, e)
            return None
        if emeta.encoding != Encoding.RAW:
            self.controller.observe_encode(level, meta.payload_bytes, len(data))
        return emeta, data
