"""Builds the remote tier's parts from config: the one integration point for the chain.

    parts = build_remote(config.remote, resolve=registry.get, tenant_of=lambda ns: registry.get(ns).tenant)
    chain: on a local miss  -> parts.reader.fetch_prefix(cids, ns.chunk_tokens), promote each chunk
           after a local put -> parts.uploader.submit(cid, meta, payload)
           status / metrics  -> parts.tier.remote_stats(), parts.uploader.stats(),
                                parts.controller.snapshot()
           shutdown          -> parts.close()
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ...config import RemoteConfig, TierCodec
from ...types import Encoding
from ..transcode import NamespaceResolver, Transcoder
from .adaptive import AdaptiveController, FloorHook, ThroughputMeter, Trial
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
    codec = Transcoder(resolve) if resolve is not None else None
    controller = AdaptiveController(cfg, meter, floor_for, codec_trial(codec) if codec else None,
                                    (lambda ns: resolve(ns).dtype.itemsize) if resolve is not None else None)
    uploader = RemoteUploader(tier, controller, codec.encode if codec else None, cfg)
    reader = RemoteReader(tier, controller, codec.decode if codec else None)
    return RemoteParts(tier, controller, uploader, reader)


#: Decodes timed per level when calibrating; the fastest counts (a shared box's other work
#: only ever makes one slower).
CALIBRATION_DECODES = 3


def codec_trial(codec: Transcoder) -> Trial:
    """The controller's calibration trial: one RAW chunk encoded at a level and decoded back
    (one thread, as the reader decodes), timing the fastest of ``CALIBRATION_DECODES``."""
    def trial(cid, meta, payload, level: TierCodec) -> tuple[int, float]:
        emeta, data = codec.encode(cid, meta, payload, level)
        if emeta.encoding != Encoding.CODEC:
            raise ValueError("the codec keeps this namespace's chunks RAW")
        best = float("inf")
        for _ in range(CALIBRATION_DECODES):
            t0 = time.perf_counter()
            codec.decode(emeta, data)
            best = min(best, time.perf_counter() - t0)
        return len(data), best
    return trial
