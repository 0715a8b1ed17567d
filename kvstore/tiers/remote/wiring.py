"""Builds the remote tier's parts from config: the one integration point for the chain.

    parts = build_remote(config.remote, resolve=registry.get, tenant_of=lambda ns: registry.get(ns).tenant)
    chain: on a local miss  -> parts.reader.fetch_prefix(cids, ns.chunk_tokens), promote each chunk
           after a local put -> parts.uploader.submit(cid, meta, payload)
           status / metrics  -> parts.tier.remote_stats(), parts.uploader.stats(),
                                parts.controller.snapshot()
           shutdown          -> parts.close()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...config import RemoteConfig
from ..transcode import NamespaceResolver, Transcoder
from .adaptive import AdaptiveController, FloorHook, ThroughputMeter
from .link import RedisLink
from .reader import RemoteReader
from .tier import QuotaResolver, RemoteTier, TenantResolver
from .uploader import RemoteUploader


@dataclass(frozen=True, slots=True)
class RemoteParts:
    tier: RemoteTier
    controller: AdaptiveController
    uploader: RemoteUploader
    reader: RemoteReader

    def close(self) -> None:
        self.uploader.close()
        self.tier.close()


def build_remote(cfg: RemoteConfig, resolve: NamespaceResolver | None = None,
                 tenant_of: TenantResolver | None = None, floor_for: FloorHook | None = None,
                 clock: Callable[[], float] | None = None, link: RedisLink | None = None,
                 quota_of: QuotaResolver | None = None) -> RemoteParts:
    """Without ``resolve`` (namespace id -> Namespace) chunks travel as given (no codec).
    ``quota_of``: a tenant's ``quotas.max_remote_bytes`` (the daemon's ledger)."""
    meter = ThroughputMeter(cfg.initial_throughput_bytes_per_s, cfg.throughput_ewma_alpha)
    tier = RemoteTier(cfg, tenant_of=tenant_of, meter=meter, link=link, quota_of=quota_of,
                      **({"clock": clock} if clock else {}))
    controller = AdaptiveController(cfg, meter, floor_for)
    codec = Transcoder(resolve) if resolve is not None else None
    uploader = RemoteUploader(tier, controller, codec.encode if codec else None, cfg)
    reader = RemoteReader(tier, controller, codec.decode if codec else None)
    return RemoteParts(tier, controller, uploader, reader)
