"""``RemoteReader``: the read path from the remote tier, for a local miss.

``fetch_prefix(cids)`` finds the longest present prefix in one pipelined round trip (GETRANGE
of each value's header, which also gives the stored sizes and levels), chooses per batch
between the primary copies and the small companions (the primaries when their expected load
time at the measured throughput fits the budget, else whichever is expected to load faster:
transfer + decode), fetches concurrently, verifies (the tier checks every CRC) and hands back ``FetchedChunk``s
in order for the caller to promote into DRAM (and disk by policy). With a ``decode``
function the chunks come back RAW (what same-host clients load); otherwise as stored.

Pipelined: the prefix is fetched in groups of ``FETCH_GROUP_CHUNKS``; while the caller's
thread decodes one group, the next is already in flight (one prefetch thread per reader
call, from a small shared pool; the Redis I/O itself runs on the link's loop thread and the
native decoder releases the GIL), so a prefix loads in about max(transfer, decode) instead
of their sum. The whole call (existence check and every group) is bounded by one
``remote.timeout_ms`` deadline.

Never raises for a remote failure: the result is shorter (possibly empty). Any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from ...config import TierCodec
from ...errors import DataLoss
from ...types import ChunkId, ChunkMeta, Encoding, split_chunk_id
from .adaptive import AdaptiveController
from .tier import RemoteTier

log = logging.getLogger(__name__)

#: ``(meta, payload) -> (RAW meta, RAW bytes-like)`` (``Transcoder.decode``); raises DataLoss.
Decoder = Callable[[ChunkMeta, object], tuple[ChunkMeta, object]]

#: Chunks per pipelined fetch: large enough that a group's concurrent GETs fill the link,
#: small enough that decoding the first group starts early.
FETCH_GROUP_CHUNKS = 4
#: Threads that run group fetches ahead of the decoders (each only waits on the link's loop).
_PREFETCH_THREADS = 4


@dataclass(frozen=True, slots=True)
class FetchedChunk:
    cid: ChunkId
    meta: ChunkMeta
    payload: object
    level: TierCodec | None
    small: bool


class RemoteReader:
    def __init__(self, tier: RemoteTier, controller: AdaptiveController, decode: Decoder | None = None) -> None:
        self.tier, self.controller, self._decode = tier, controller, decode
        self.corrupt_decodes = 0

    def fetch_prefix(self, cids: list[ChunkId], num_tokens: int | None = None) -> list[FetchedChunk]:
        """The longest run of ``cids`` (from the first) that the remote tier holds, verified.
        ``num_tokens`` per chunk enables the budget check that may pick small companions."""
        heads = self.tier.headers(list(cids)) or []
        n = next((i for i, h in enumerate(heads) if h is None), len(heads))
        if n == 0:
            return []
        small = False
        if num_tokens and self.tier.cfg.small_companion:
            small = self._prefer_small(split_chunk_id(cids[0])[0], heads[:n], num_tokens * n)
        end = time.monotonic() + self.tier.link.timeout_s
        groups = [list(cids[i:min(n, i + FETCH_GROUP_CHUNKS)]) for i in range(0, n, FETCH_GROUP_CHUNKS)]
        out: list[FetchedChunk] = []
        pending: Future | None = self._fetch_async(groups[0], small, end)
        for k in range(len(groups)):
            values = pending.result()
            pending = self._fetch_async(groups[k + 1], small, end) if k + 1 < len(groups) else None
            for cid, v in zip(groups[k], values):
                f = self._finish(cid, v)
                if f is None:
                    return out  # vanished, expired or undecodable: the prefix ends here (the
                    # group in flight is dropped when it arrives)
                out.append(f)
        return out

    def _prefer_small(self, namespace_id: bytes, heads: list[tuple[int, TierCodec | None]], tokens: int) -> bool:
        """Whether to fetch the small companions instead of the primaries: only when the
        primaries do not fit the budget at the measured throughput and the companions are
        expected to load faster (a smaller level saves transfer but may cost more decode
        than it saves). The primaries' level and size come from their headers."""
        self.controller.priors_for(namespace_id)
        wire = sum(size for size, _ in heads)
        primary = heads[0][1] or TierCodec.LOSSLESS
        small_level = self.controller.small_level(namespace_id)
        if small_level == primary:
            return False
        raw = self.controller.raw_bytes(primary, wire)
        if self.controller.fits(primary, tokens, raw, wire):
            return False
        return self.controller.expected_s(small_level, raw) < self.controller.expected_s(primary, raw, wire)

    def _fetch_async(self, cids: list[ChunkId], small: bool, end: float) -> Future:
        left = max(0.0, end - time.monotonic())
        if left <= 0:
            done: Future = Future()
            done.set_result([None] * len(cids))
            return done
        return _pool().submit(self.tier.get_values, cids, small, left)

    def _finish(self, cid: ChunkId, v) -> FetchedChunk | None:
        """One fetched value as the caller wants it (decoded to RAW with a decoder), or None."""
        if v is None:
            return None
        self.controller.record("fetch", v.level or TierCodec.RAW)
        meta, payload = v.meta, v.payload
        if self._decode is not None and meta.encoding == Encoding.CODEC:
            t0 = time.perf_counter()
            try:
                meta, payload = self._decode(meta, payload)
            except DataLoss as e:
                log.warning("remote chunk %s does not decode (%s); dropped", cid.hex()[:16], e)
                self.corrupt_decodes += 1
                self.tier.delete(cid)
                return None
            if v.level is not None:
                self.controller.observe_decode(v.level, meta.payload_bytes, time.perf_counter() - t0)
            if not self.controller.calibrated and v.level == TierCodec.LOSSLESS:
                # The first exact chunk: measure every level, off this path (a lossy level's
                # output is already quantized and would mislead the model).
                _pool().submit(self.controller.calibrate_once, cid, meta, payload)
        return FetchedChunk(cid, meta, payload, v.level, v.small)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The process's prefetch threads (created on first use; daemon threads of the pool)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(_PREFETCH_THREADS, thread_name_prefix="kvstore-remote-prefetch")
        return _POOL
