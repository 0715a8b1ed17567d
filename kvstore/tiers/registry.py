"""The tier registry: one entry per medium, so the chain builder never names a tier.

Adding a tier is one new module plus one ``register(TierEntry(...))`` line below (the module
is imported lazily, so an optional dependency such as a Redis client is only needed when
that tier is configured). The chain code does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import config as cfg
from ..domain.errors import InvalidArgument
from ..domain.types import Medium
from .base import PinTable, Tier

#: Queue bound for write-behind into a tier whose config section has no
#: ``write_queue_chunks``: the disk tier's default (256 chunks, a few GB of 40 MB chunks).
DEFAULT_WRITE_QUEUE_CHUNKS = 256


@dataclass(frozen=True)
class BuildContext:
    """What every tier factory gets."""

    config: cfg.Config
    pins: PinTable
    clock: Callable[[], float]
    #: Re-check CRC32C on every ``get`` of an in-memory tier before its bytes are served
    #: (corrupt copies are dropped and the chain reads the next tier). On by default: the
    #: hardware CRC costs a fraction of the copy (numbers in docs/local-path.md).
    verify_crc: bool = True
    #: Namespace id -> ``kvstore_wire.keys.Namespace`` (raises NotFound); None when the chain
    #: is built without the namespace registry (tiers that need it then treat chunks as opaque).
    resolve: Callable[[bytes], object] | None = None
    #: The daemon's quota ledger: tiers charge their chunks' bytes to their tenants
    #: (``quotas.max_dram_bytes`` ...). None: nothing is charged (a chain built alone).
    quotas: object | None = None

    def account(self, resource):
        """A ``quotas.TierAccount`` charging ``resource`` for a tier, or None without a ledger."""
        if self.quotas is None:
            return None
        from ..quotas import TierAccount
        resolve = self.resolve
        return TierAccount(self.quotas, resource, (lambda ns: resolve(ns).tenant) if resolve is not None else None)


@dataclass(frozen=True)
class TierEntry:
    medium: Medium
    #: Builds the tier from the daemon config (may raise InvalidArgument / Unavailable).
    build: Callable[[BuildContext], Tier]
    #: Whether a chunk stored here survives a restart (PERSISTED puts need one such tier).
    durable: bool
    #: The tier's config section's ``enabled`` (True when it has none).
    enabled: Callable[[cfg.Config], bool] = lambda c: True
    #: The codec the tier stores chunks with (``TierCodec.RAW``: as they come).
    codec: Callable[[cfg.Config], cfg.TierCodec] = lambda c: cfg.TierCodec.RAW
    #: Bound of the write-behind queue into this tier.
    write_queue_chunks: Callable[[cfg.Config], int] = lambda c: DEFAULT_WRITE_QUEUE_CHUNKS
    #: The link mode into this tier when ``chain.link_write_mode`` does not name it (None:
    #: ``chain.write_mode``). A tier with its own queue (the remote uploader) says write-through.
    write_mode: Callable[[cfg.Config], cfg.WriteMode | None] = lambda c: None
    #: Wires a tier that demotes what it evicts to the tier below it (``(tier, below)``; None:
    #: the tier drops victims, whose copies below come from the chain's links).
    demote_into: Callable[[Tier, Tier], None] | None = None


_REGISTRY: dict[Medium, TierEntry] = {}


def register(entry: TierEntry) -> None:
    _REGISTRY[entry.medium] = entry


def entry(medium: Medium) -> TierEntry:
    try:
        return _REGISTRY[medium]
    except KeyError:
        have = ", ".join(m.name.lower() for m in _REGISTRY)
        raise InvalidArgument(f"chain.tiers names {medium.name.lower()!r}, but this build has no such tier "
                              f"(available: {have}); remove it from chain.tiers") from None


def _dram(ctx: BuildContext) -> Tier:
    from ..quotas import Resource
    from .dram import DramTier
    return DramTier(ctx.config.dram, ctx.pins, ctx.clock, verify_crc=ctx.verify_crc,
                    account=ctx.account(Resource.DRAM_BYTES))


def _disk(ctx: BuildContext) -> Tier:
    from ..quotas import Resource
    from .disk import DiskTier
    return DiskTier(ctx.config.disk, ctx.pins, ctx.clock, account=ctx.account(Resource.DISK_BYTES))


def _remote(ctx: BuildContext) -> Tier:
    from ..domain.errors import NotFound
    from .remote.level import RemoteLevel
    from .remote.wiring import build_remote

    resolve = ctx.resolve

    def tenant_of(ns_id: bytes) -> str:
        return resolve(ns_id).tenant

    def chunk_tokens(ns_id: bytes) -> int | None:
        try:
            return resolve(ns_id).chunk_tokens
        except NotFound:
            return None

    quota_of = None
    if ctx.quotas is not None:
        from ..quotas import Resource
        ledger = ctx.quotas

        def quota_of(tenant: str) -> int | None:
            return ledger.limits(tenant).limit(Resource.REMOTE_BYTES)

    parts = build_remote(ctx.config.remote, resolve=resolve, tenant_of=tenant_of if resolve else None,
                         quota_of=quota_of)
    return RemoteLevel(parts, chunk_tokens if resolve else None)


def _hbm(ctx: BuildContext) -> Tier:
    from .hbm import make_hbm_tier   # CUDA is loaded only here, when chain.tiers names "hbm"
    return make_hbm_tier(ctx.config.hbm.capacity_bytes, ctx.config.hbm.device, ctx.pins)


def _hbm_demote(tier: Tier, below: Tier) -> None:
    from .hbm import demote_into
    demote_into(tier, below)


register(TierEntry(Medium.HBM, _hbm, durable=False, demote_into=_hbm_demote))
register(TierEntry(Medium.DRAM, _dram, durable=False, codec=lambda c: c.dram.codec))
register(TierEntry(Medium.DISK, _disk, durable=True, enabled=lambda c: c.disk.enabled,
                   codec=lambda c: c.disk.codec, write_queue_chunks=lambda c: c.disk.write_queue_chunks))
register(TierEntry(Medium.REMOTE, _remote, durable=False, enabled=lambda c: c.remote.enabled,
                   write_mode=lambda c: cfg.WriteMode.WRITE_THROUGH))
