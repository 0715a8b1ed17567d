"""``Store``: the one facade the gRPC servicers call. Typed arguments and results; the
servicers never reach into the chain, the tiers or the codec.

It owns the namespace registry, the tier chain, the codec converter, the presence index
and the same-host access (``local``). ``Store.open(config)`` builds all of them.

Threading: as ``TierChain``: ``lookup``, ``locate``, ``pin``, ``unpin``, ``namespace``,
``stats`` are non-blocking (event loop); the rest may do I/O or run native code for
milliseconds (worker threads).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import kvstore_native as native
from kvstore_wire.presence import FLAG_MISS_ASK_DAEMON
from .. import config as cfg
from ..chain import ChainStats, TierChain, build_chain
from ..domain.errors import DataLoss, FailedPrecondition, InvalidArgument
from ..domain.namespaces import NamespaceInfo, NamespaceRegistry
from ..quotas import QuotaLedger, ledger_from_config
from ..domain.results import KeyInfo, LookupResult, PutResult
from ..domain.types import ChunkId, ChunkMeta, Durability, Encoding, Medium
from ..tiers.base import ChunkRef, Tier
from ..remote_metrics import RemoteCollector
from ..tiers.presence import PresenceIndex
from ..tiers.transcode import Transcoder
from .limits import PinAccount, TenantLimits
from .local import LocalAccess

if TYPE_CHECKING:
    from ..events import KVEventPublisher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreStats:
    chain: ChainStats
    namespaces: int
    #: ``(tenant, ((resource, used, limit or None), ...))`` for every tenant holding something.
    tenants: tuple = ()


class Store:
    def __init__(self, chain: TierChain, namespaces: NamespaceRegistry, transcoder: Transcoder,
                 network_codec: cfg.TierCodec, presence: PresenceIndex | None = None, worker_threads: int = 4,
                 limits: QuotaLedger | None = None, events: "KVEventPublisher | None" = None) -> None:
        self.namespaces = namespaces
        #: The daemon's quota ledger (``[quotas]`` plus per-token overrides): pinned bytes and
        #: pin TTLs here, open leases and reservations in the server's LeaseTable, streams in
        #: the interceptor, tier bytes in the tiers. One source for every per-tenant limit.
        self.limits: QuotaLedger = limits if limits is not None else namespaces.quotas
        self._pins = PinAccount(self.limits)
        self._chain = chain
        self._transcoder = transcoder
        self._network_codec = network_codec
        self._presence = presence
        #: The KV events publisher (``events.enabled``), or None.
        self.events = events
        #: Remote tier, uploader, chosen levels and events counters: ``.status()`` (a dict,
        #: for kvctl) and a Prometheus collector.
        self.remote_status = RemoteCollector(_remote_parts(chain), events)
        self.local = LocalAccess(chain, presence.path if presence is not None else None, worker_threads)

    @classmethod
    def open(cls, config: cfg.Config, clock: Callable[[], float] = time.time, *,
             wrap: Mapping[Medium, Callable[[Tier], Tier]] | None = None, verify_crc: bool = True) -> "Store":
        """Builds the registry, the chain of ``config.chain`` and the presence index.
        ``wrap`` wraps tiers by medium (tests: ``FaultyTier``)."""
        ledger = ledger_from_config(config.quotas, config.auth, config.dram.capacity_bytes)
        registry = NamespaceRegistry(config.disk.path, config.server.max_chunk_bytes, fsync=config.disk.fsync,
                                     quotas=ledger)
        resolve = lambda nid: registry.get(nid, None).namespace  # noqa: E731 - NotFound when unknown
        transcoder = Transcoder(resolve)
        chain = build_chain(config, transcoder, clock, wrap=wrap, verify_crc=verify_crc, resolve=resolve,
                            quotas=ledger)
        presence = events = None
        try:
            presence = _open_presence(chain, config.dram.presence_buckets)
            events = _open_events(config.events)
            _listen(chain, presence, events)
        except BaseException:
            if events is not None:
                events.close()
            chain.close()
            if presence is not None:
                presence.close()
            raise
        return cls(chain, registry, transcoder, config.server.network_codec, presence, config.server.worker_threads,
                   limits=ledger, events=events)

    # -- namespaces -----------------------------------------------------------------------------
    def namespace(self, namespace_id: bytes, tenant_scope: str | None) -> NamespaceInfo:
        """The namespace, NotFound when unknown or owned by another tenant than ``tenant_scope``."""
        return self.namespaces.get(namespace_id, tenant_scope)

    # -- data -----------------------------------------------------------------------------------
    def put(self, cid: ChunkId, meta: ChunkMeta, payload, durability: Durability, where: str = "chunk") -> PutResult:
        """Verifies the payload against ``meta.crc32c`` (0: none was sent, it is computed) and
        stores it. DataLoss when the checksum does not match (nothing is stored)."""
        crc = native.crc32c(payload)
        if meta.crc32c and crc != meta.crc32c:
            raise DataLoss(f"{where}: CRC32C of the received payload is {crc:#010x}, the header says "
                           f"{meta.crc32c:#010x}; the data was corrupted in transit or the sender computed the "
                           "checksum over different bytes. Nothing was stored; retry the put")
        if not meta.crc32c:
            meta = meta.with_payload(meta.encoding, meta.payload_bytes, crc)
        return self._chain.put(cid, meta, payload, durability)

    def lookup(self, cids: Sequence[ChunkId], pin_ttl_s: float = 0, tenant: str = "",
               chunk_bytes: int = 0) -> LookupResult:
        """The leading run of present chunks. ``pin_ttl_s > 0`` also pins that run for
        ``min(pin_ttl_s, quotas.max_pin_ttl_s)`` seconds (the tenant's), counted as
        ``chunk_bytes`` each against its ``quotas.max_pinned_bytes`` (ResourceExhausted,
        nothing pinned, when over)."""
        media = self._chain.lookup(cids)
        ttl = min(pin_ttl_s, self.limits.limits(tenant).max_pin_ttl_s)
        if ttl > 0 and media:
            run = cids[:len(media)]
            self._pins.charge(tenant, run, ttl, chunk_bytes)
            self._chain.lookup(run, ttl)
        return LookupResult(tuple(media))

    @property
    def serves_prefixes(self) -> bool:
        """Whether a local miss can be filled from a lower level (the remote tier): the event
        loop checks this (a plain attribute) before sending ``fill_prefix`` to a worker."""
        return self._chain.serves_prefixes

    def fill_prefix(self, cids: Sequence[ChunkId]) -> int:
        """Worker threads: fetches the part of the prefix ``cids`` that the local tiers miss
        from the levels that serve prefixes (one batch each) and promotes it into the local
        tiers, so ``lookup``, ``get`` and same-host leases find it. Returns the length of the
        leading run now present. A remote that is slow or down is a shorter run within its
        deadline, never an error."""
        return self._chain.fill_prefix(cids)

    def locate(self, cids: Sequence[ChunkId]) -> list[Medium | None]:
        return self._chain.locate(cids)

    def get(self, cid: ChunkId) -> ChunkRef | None:
        """A lease on the chunk as stored (release it, or use ``with``), or None."""
        return self._chain.get(cid)

    def read_as(self, ref: ChunkRef, want: Encoding) -> tuple[ChunkMeta, memoryview]:
        """The leased chunk in encoding ``want`` (the lease's own bytes when it already is):
        RAW decodes a bitstream, CODEC encodes with ``server.network_codec``."""
        if want == ref.meta.encoding:
            return ref.meta, ref.view
        if want == Encoding.RAW:
            meta, arr = self._transcoder.decode(ref.meta, ref.view)
        elif want == Encoding.CODEC:
            meta, arr = self._transcoder.encode(ref.cid, ref.meta, ref.view, self._network_codec)
        else:
            raise InvalidArgument(f"encoding={int(want)} is not one a chunk can be sent in; use RAW or CODEC")
        return meta, memoryview(arr).cast("B")

    def delete(self, cids: Sequence[ChunkId]) -> int:
        return sum(1 for c in cids if self._chain.delete(c))

    def clear_namespace(self, namespace_id: bytes) -> int:
        return self._chain.delete_prefix(namespace_id)

    def clear_tenant(self, tenant: str) -> int:
        """Deletes every chunk of the tenant's namespaces and forgets the namespaces."""
        infos = self.namespaces.list(tenant)
        n = sum(self._chain.delete_prefix(i.namespace_id) for i in infos)
        self.namespaces.remove(i.namespace_id for i in infos)
        return n

    def evict(self, cids: Sequence[ChunkId] | None = None, medium: Medium | None = None) -> int:
        return self._chain.evict(cids, medium)

    def pin(self, cids: Sequence[ChunkId], ttl_s: float = 0) -> int:
        return sum(1 for c in cids if self._chain.pin(c, ttl_s))

    def unpin(self, cids: Sequence[ChunkId]) -> int:
        return sum(1 for c in cids if self._chain.unpin(c))

    def entries(self, prefix: bytes = b"", medium: Medium | None = None, after: bytes = b"",
                limit: int = 100) -> list[KeyInfo]:
        return self._chain.entries(prefix, medium, after, limit)

    def inspect(self, cid: ChunkId) -> KeyInfo | None:
        return self._chain.inspect(cid)

    def stats(self) -> StoreStats:
        return StoreStats(self._chain.stats(), len(self.namespaces), self.tenant_usage())

    def tenant_usage(self) -> tuple:
        """What each tenant holding something holds against each of its quotas, from the
        one ledger every limit is charged to."""
        out = []
        for tenant in self.limits.tenants():
            limits, used = self.limits.limits(tenant), self.limits.usage(tenant)
            out.append((tenant, tuple((r, used[r], limits.limit(r)) for r in used)))
        return tuple(out)

    # -- lifecycle ------------------------------------------------------------------------------
    def flush(self, timeout_s: float | None = None) -> None:
        self._chain.flush(timeout_s)

    def scrub(self, progress=None):
        """Verifies every chunk at rest in every tier that can (worker thread; long). Returns
        the reports of the tiers that ran; FailedPrecondition when no tier keeps chunks at rest."""
        reports = [r for r in (lv.tier.scrub(progress) for lv in self._chain.levels) if r is not None]
        if not reports:
            raise FailedPrecondition("no tier keeps chunks at rest (the disk tier is off: disk.enabled = false): "
                                     "nothing to verify")
        return reports

    def close(self) -> None:
        """Drains and closes the chain, then removes the presence index. Idempotent."""
        self.local.close()
        self._chain.close()
        self.namespaces.close()
        if self.events is not None:
            self.events.close()
            self.events = None
        if self._presence is not None:
            self._presence.close()
            self._presence = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_presence(chain: TierChain, buckets: int) -> PresenceIndex | None:
    """The presence index beside the shared arena, fed by every tier's change events."""
    if chain.shared_level is None or not buckets:
        return None
    shared = chain.levels[chain.shared_level].tier.shared_memory()
    try:
        presence = PresenceIndex(shared.arena_path.with_suffix(".index"), buckets, shared.nonce,
                                 FLAG_MISS_ASK_DAEMON if chain.serves_prefixes else 0)
    except OSError as e:
        log.warning("no presence index (%s): same-host lookups will use the RPC", e)
        return None
    return presence


def _remote_parts(chain: TierChain):
    """The remote tier's parts when the chain has one (the level that exposes ``parts``)."""
    for lv in chain.levels:
        tier = lv.tier
        while tier is not None:
            parts = getattr(tier, "parts", None)
            if parts is not None:
                return parts
            tier = getattr(tier, "inner", None)
    return None


def _open_events(config: cfg.EventsConfig) -> "KVEventPublisher | None":
    if not config.enabled:
        return None
    from ..events import KVEventPublisher  # needs pyzmq: only when events are on
    return KVEventPublisher(config)


def _listen(chain: TierChain, presence: PresenceIndex | None, events: "KVEventPublisher | None") -> None:
    """Feeds every tier's change events to the presence index and the events publisher, and
    tells both what the tiers hold now."""
    if events is None:
        if presence is None:
            return
        listener = presence.changed
    else:
        from ..events.publisher import fan_out
        listener = fan_out(presence.changed if presence is not None else None, events.listener)
    chain.set_listener(listener)
    if events is not None:
        # A (re)started daemon: subscribers drop what an earlier run told them (a fresh
        # arena, a rebuilt index) and take what is present now from the first batch.
        for lv in chain.levels:
            events.cleared(lv.medium)
    for lv in chain.levels:
        for e in lv.tier.scan():
            listener(e.cid, lv.medium, True)
