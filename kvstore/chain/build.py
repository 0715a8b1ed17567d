"""Builds a ``TierChain`` from config: ``chain.tiers`` through the tier registry.

For each configured (and enabled) tier: the registry builds it; a codec other than raw wraps
it in ``CodecTier``; the caller's ``wrap`` (tests, chaos runs: ``FaultyTier``) wraps that;
the link into it gets ``chain.link_write_mode`` (else ``chain.write_mode``); a tier whose
entry has ``demote_into`` (HBM) is wired to put its victims into the level below. Nothing here
names a particular tier.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

from .. import config as cfg
from ..domain.errors import FailedPrecondition
from ..domain.types import Medium
from ..tiers import registry
from ..tiers.base import PinTable, Tier
from ..tiers.codec import CodecTier
from ..tiers.transcode import Transcoder
from .chain import Level, TierChain


def build_chain(config: cfg.Config, transcoder: Transcoder | None = None,
                clock: Callable[[], float] = time.time, *,
                wrap: Mapping[Medium, Callable[[Tier], Tier]] | None = None,
                verify_crc: bool = True, resolve: Callable[[bytes], object] | None = None,
                quotas=None) -> TierChain:
    """The chain ``config`` describes. ``transcoder`` is needed when a tier has a codec
    (FailedPrecondition otherwise). ``verify_crc``: in-memory tiers check every chunk's
    CRC32C on ``get`` (False only for benchmarks that measure the unchecked path).
    ``resolve`` (namespace id -> Namespace) is handed to the tier factories. On failure
    ``quotas`` (a ``QuotaLedger``): tiers charge their chunks to their tenants. On failure
    every tier built so far is closed."""
    pins = PinTable(clock)
    ctx = registry.BuildContext(config, pins, clock, verify_crc, resolve, quotas)
    entries = [registry.entry(m) for m in config.chain.tiers]
    levels: list[Level] = []
    demoting: list[tuple[int, registry.TierEntry, Tier]] = []   # (level, entry, unwrapped tier)
    try:
        for e in entries:
            if not e.enabled(config):
                continue
            tier = e.build(ctx)
            if e.demote_into is not None:
                demoting.append((len(levels), e, tier))
            codec = e.codec(config)
            if codec != cfg.TierCodec.RAW:
                if transcoder is None:
                    tier.close()
                    raise FailedPrecondition(f"{e.medium.name.lower()}.codec = {codec.value} needs the namespace "
                                             "registry (build the chain through the Store), or set it to raw")
                tier = CodecTier(tier, codec, transcoder)
            if wrap and e.medium in wrap:
                tier = wrap[e.medium](tier)
            levels.append(Level(tier, e.durable,
                                config.chain.link_write_mode.get(e.medium, e.write_mode(config) or config.chain.write_mode),
                                e.write_queue_chunks(config), config.chain.promote_on_hit,
                                config.chain.write_behind_fraction))
        if not levels:
            raise FailedPrecondition("every tier in chain.tiers is disabled; enable at least one")
        for i, e, tier in demoting:   # eviction from such a tier demotes into the level below
            if i + 1 < len(levels):
                e.demote_into(tier, levels[i + 1].tier)
        return TierChain(levels, pins)
    except BaseException:
        for lv in reversed(levels):
            lv.tier.close()
        raise
