"""``RemoteReader``: the read path from the remote tier, for a local miss.

``fetch_prefix(cids)`` finds the longest present prefix in one pipelined round trip (STRLEN
per chunk, which also gives the stored sizes), chooses per batch between the primary copies
and the small companions (the primaries when their expected load time at the measured
throughput fits the budget, else whichever is expected to load faster: transfer + decode), fetches concurrently, verifies (the tier
checks every CRC) and hands back ``FetchedChunk``s in order for the caller to promote into
DRAM (and disk by policy). With a ``decode`` function the chunks come back RAW (what
same-host clients load); otherwise as stored.

Never raises for a remote failure: the result is shorter (possibly empty). Any thread.
"""

from __future__ import annotations

import logging
import time
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

#: RAW bytes per wire byte assumed for a stored value before it is fetched: the primary's
#: level is only known from its header, so the choice assumes the best level (lossless,
#: 1/0.86), the conservative side for the decode-time estimate.
_ASSUMED_EXPANSION = 1 / 0.86


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
        sizes = self.tier.sizes(list(cids)) or []
        n = next((i for i, s in enumerate(sizes) if not s), len(sizes))
        if n == 0:
            return []
        small = False
        if num_tokens and self.tier.cfg.small_companion:
            wire = sum(sizes[:n])
            primary, raw = TierCodec.LOSSLESS, int(wire * _ASSUMED_EXPANSION)
            if not self.controller.fits(primary, num_tokens * n, raw, wire):
                # Over budget: the companion only when it is expected to load faster (a
                # smaller level saves transfer but may cost more decode than it saves).
                level = self.controller.small_level(split_chunk_id(cids[0])[0])
                small = self.controller.expected_s(level, raw) < self.controller.expected_s(primary, raw, wire)
        out: list[FetchedChunk] = []
        for cid, v in zip(cids[:n], self.tier.get_values(list(cids[:n]), small=small)):
            if v is None:
                break  # expired or failed since the check: the prefix ends here
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
                    break
                if v.level is not None:
                    self.controller.observe_decode(v.level, meta.payload_bytes, time.perf_counter() - t0)
            out.append(FetchedChunk(cid, meta, payload, v.level, v.small))
        return out
