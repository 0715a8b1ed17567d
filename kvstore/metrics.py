"""Prometheus exporter: reads plain stats objects, never sits on the request path.

The servicers keep ``RequestStats`` (counters and fixed-bucket latency histograms per RPC
method and status code) as plain Python objects; the store reports ``StoreStats``.
``KVStoreCollector`` turns both into Prometheus metric families when scraped.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the latency buckets: 50 us .. 10 s, covering a DRAM lookup
#: (tens of microseconds) up to a multi-chunk Get from disk.
LATENCY_BUCKETS_S = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0)


class _Histogram:
    __slots__ = ("counts", "total_s", "n")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.total_s = 0.0
        self.n = 0


class RequestStats:
    """Per-(method, code) request counts, latency histograms per method, and payload bytes.

    ``observe`` is called once per RPC on the event-loop thread; ``snapshot`` may run on the
    exporter's thread, so both take a lock (uncontended on the hot path: a few hundred ns).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.started_s = time.time()

    def observe(self, method: str, code: str, seconds: float) -> None:
        i = bisect.bisect_left(LATENCY_BUCKETS_S, seconds)
        with self._lock:
            key = (method, code)
            self.requests[key] = self.requests.get(key, 0) + 1
            h = self.latency.get(method)
            if h is None:
                h = self.latency[method] = _Histogram()
            h.counts[i] += 1
            h.total_s += seconds
            h.n += 1

    def add_bytes(self, received: int = 0, sent: int = 0) -> None:
        with self._lock:
            self.bytes_in += received
            self.bytes_out += sent

    def snapshot(self) -> tuple[dict, dict, int, int]:
        with self._lock:
            lat = {m: (list(h.counts), h.total_s, h.n) for m, h in self.latency.items()}
            return dict(self.requests), lat, self.bytes_in, self.bytes_out


class KVStoreCollector:
    """A prometheus_client custom collector over ``Store.stats()`` and ``RequestStats``."""

    def __init__(self, store_stats: Callable[[], object], requests: RequestStats) -> None:
        self._store_stats = store_stats
        self._requests = requests

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snap = self._store_stats()
        st = snap.chain
        per_tier = {
            "capacity_bytes": GaugeMetricFamily("kvstore_tier_capacity_bytes", "Tier byte budget", labels=["tier"]),
            "used_bytes": GaugeMetricFamily("kvstore_tier_used_bytes", "Bytes held by the tier", labels=["tier"]),
            "chunks": GaugeMetricFamily("kvstore_tier_chunks", "Chunks held by the tier", labels=["tier"]),
            "pinned_chunks": GaugeMetricFamily("kvstore_tier_pinned_chunks", "Pinned chunks", labels=["tier"]),
            "hits": CounterMetricFamily("kvstore_tier_hits", "Reads answered by the tier", labels=["tier"]),
            "misses": CounterMetricFamily("kvstore_tier_misses", "Reads the tier could not answer", labels=["tier"]),
            "evictions": CounterMetricFamily("kvstore_tier_evictions", "Chunks evicted", labels=["tier"]),
            "corrupt": CounterMetricFamily("kvstore_tier_corrupt", "Chunks dropped for a failed checksum",
                                           labels=["tier"]),
        }
        for t in st.tiers:
            for field, fam in per_tier.items():
                fam.add_metric([t.medium.name.lower()], getattr(t, field))
        yield from per_tier.values()
        yield GaugeMetricFamily("kvstore_write_queue_depth", "Chunks waiting to be copied to a lower tier",
                                value=st.write_queue_depth)
        yield CounterMetricFamily("kvstore_write_queue_dropped",
                                  "Lower-tier copies skipped (write-behind queue full or over its byte budget, or "
                                  "its leases given back to make room for a foreground write)",
                                  value=st.write_queue_dropped)
        yield CounterMetricFamily("kvstore_write_errors", "Lower-tier writes that failed (the chunk stayed above)",
                                  value=st.write_errors)
        yield CounterMetricFamily("kvstore_read_errors", "Tier reads that failed with an I/O error (served from "
                                  "further down or as misses)", value=st.read_errors)
        yield CounterMetricFamily("kvstore_promotions_skipped", "Lower-tier hits not copied up (no room above)",
                                  value=st.promotions_skipped)
        yield CounterMetricFamily("kvstore_puts_spilled", "MEMORY puts the first tier had no room for, stored in a "
                                  "lower tier instead", value=st.spilled)
        yield GaugeMetricFamily("kvstore_namespaces", "Registered namespaces", value=snap.namespaces)
        used = GaugeMetricFamily("kvstore_tenant_used", "What a tenant holds against a quota (bytes for *_bytes "
                                 "quotas, else a count)", labels=["tenant", "quota"])
        limit = GaugeMetricFamily("kvstore_tenant_limit", "A tenant's quota (absent when unlimited)",
                                  labels=["tenant", "quota"])
        for tenant, rows in snap.tenants:
            for resource, n, cap in rows:
                used.add_metric([tenant, resource.value], n)
                if cap is not None:
                    limit.add_metric([tenant, resource.value], cap)
        yield used
        yield limit

        reqs, lat, b_in, b_out = self._requests.snapshot()
        c = CounterMetricFamily("kvstore_requests", "RPCs by method and status code", labels=["method", "code"])
        for (m, code), n in sorted(reqs.items()):
            c.add_metric([m, code], n)
        yield c
        h = HistogramMetricFamily("kvstore_request_seconds", "RPC latency", labels=["method"])
        for m, (counts, total, _n) in sorted(lat.items()):
            buckets, acc = [], 0
            for bound, cnt in zip((*map(str, LATENCY_BUCKETS_S), "+Inf"), counts):
                acc += cnt
                buckets.append((bound, acc))
            h.add_metric([m], buckets, total)
        yield h
        yield CounterMetricFamily("kvstore_payload_received_bytes", "Chunk payload bytes received", value=b_in)
        yield CounterMetricFamily("kvstore_payload_sent_bytes", "Chunk payload bytes sent", value=b_out)


def start_exporter(listen: str, collector: KVStoreCollector, *extra):
    """Serves /metrics on ``host:port`` from a daemon thread; returns the server (or None if
    disabled). ``extra``: more collectors (the remote tier's and the events publisher's)."""
    if not listen:
        return None
    from prometheus_client import CollectorRegistry, start_http_server

    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    for c in extra:
        registry.register(c)
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry)
    log.info("metrics on http://%s/metrics", listen)
    return server
