"""Protobuf <-> domain conversions (no logic beyond field mapping and defaults)."""

from __future__ import annotations

from kvstore_wire._proto.kvstore.v1 import admin_pb2, common_pb2

from ..domain.namespaces import NamespaceInfo, build_namespace
from ..domain.types import KeyKind, Medium

from kvstore_wire.keys import Namespace


def namespace_from_spec(spec: common_pb2.NamespaceSpec, tenant: str) -> Namespace:
    return build_namespace(model=spec.model, dtype=spec.dtype, num_layers=spec.num_layers,
                           num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, layout=spec.layout,
                           tp_rank=spec.tp_rank, tp_size=spec.tp_size, chunk_tokens=spec.chunk_tokens,
                           tenant=tenant)


def namespace_info(info: NamespaceInfo) -> common_pb2.NamespaceInfo:
    ns = info.namespace
    spec = common_pb2.NamespaceSpec(model=ns.model, dtype=int(ns.dtype), num_layers=ns.num_layers,
                                    num_kv_heads=ns.num_kv_heads, head_dim=ns.head_dim, layout=int(ns.layout),
                                    tp_rank=ns.tp_rank, tp_size=ns.tp_size, chunk_tokens=ns.chunk_tokens)
    return common_pb2.NamespaceInfo(namespace_id=info.namespace_id, spec=spec, tenant=ns.tenant,
                                    chunk_bytes=info.chunk_bytes)


def medium_or_none(tier: int) -> Medium | None:
    return None if tier == 0 else Medium(tier)


def key_entry(info) -> admin_pb2.KeyEntry:
    """``KeyEntry`` from the store's ``KeyInfo``."""
    cid = bytes(info.cid)
    m = info.meta
    return admin_pb2.KeyEntry(
        namespace_id=cid[:32], key=cid[32:], tiers=[int(t) for t in info.media], payload_bytes=m.payload_bytes,
        num_tokens=m.num_tokens, encoding=int(m.encoding), pinned=info.pin_expires_s is not None,
        pin_expires_unix_s=info.pin_expires_s or 0.0, created_unix_s=m.created_s,
        last_access_unix_s=info.last_access_s, hits=info.hits, key_kind=int(m.key_kind or KeyKind.PREFIX))


def tier_stats(t) -> admin_pb2.TierStats:
    return admin_pb2.TierStats(tier=int(t.medium), capacity_bytes=t.capacity_bytes, used_bytes=t.used_bytes,
                               chunks=t.chunks, hits=t.hits, misses=t.misses, evictions=t.evictions,
                               corrupt=t.corrupt, policy=str(t.policy), pinned_chunks=t.pinned_chunks)


def tenant_usage(tenants) -> list:
    """``StoreStats.tenants`` -> ``GetStatsResponse.tenants``."""
    return [admin_pb2.TenantUsage(tenant=t, quotas=[
        admin_pb2.QuotaUsage(quota=r.value, used=max(0, n), limit=cap or 0, unlimited=cap is None)
        for r, n, cap in rows]) for t, rows in tenants]


def remote_status(status: dict) -> dict:
    """``RemoteCollector.status()`` -> GetStatsResponse fields (``remote``, ``events``)."""
    out = {}
    if "remote" in status:
        r, u = status["remote"], status["upload"]
        out["remote"] = admin_pb2.RemoteStatus(
            hits=r["hits"], misses=r["misses"], hit_rate=r["hit_rate"], bytes_read=r["bytes_read"],
            bytes_written=r["bytes_written"], stored=r["stored"], already_present=r["already_present"],
            quota_rejections=r["quota_rejections"], corrupt=r["corrupt"], errors=r["errors"],
            throughput_bytes_per_s=r["throughput_bytes_per_s"], upload_queued=u["queued"],
            uploads_skipped=u["skipped_queue_full"], uploaded=u["uploaded"], upload_deduplicated=u["deduplicated"],
            upload_retried_batches=u["retried_batches"], level_decisions=status["levels"])
    if "events" in status:
        out["events"] = admin_pb2.EventsStatus(**status["events"])
    return out
