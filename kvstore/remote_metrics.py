"""Prometheus families for the remote tier, its uploader, the adaptive controller and the KV
events publisher: plain stats objects in, metric families out (``kvstore.metrics`` style).

Register next to ``KVStoreCollector``:
``REGISTRY.register(RemoteCollector(parts, publisher))`` (either may be None). ``status``
gives the same numbers as a plain dict for kvctl / the Admin service.
"""

from __future__ import annotations

from dataclasses import asdict


class RemoteCollector:
    def __init__(self, parts=None, publisher=None) -> None:
        self._parts = parts
        self._publisher = publisher

    def status(self) -> dict:
        """Remote bytes, hit rate, upload queue, skipped uploads, chosen levels; events counters."""
        out: dict = {}
        if self._parts is not None:
            t = self._parts.tier.remote_stats()
            u = self._parts.uploader.stats()
            reads = t.hits + t.misses
            out["remote"] = {**asdict(t), "hit_rate": t.hits / reads if reads else 0.0}
            out["upload"] = asdict(u)
            out["levels"] = self._parts.controller.snapshot()["decisions"]
        if self._publisher is not None:
            out["events"] = asdict(self._publisher.stats())
        return out

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if self._parts is not None:
            t = self._parts.tier.remote_stats()
            for name, help_, value in (
                    ("hits", "Remote reads answered", t.hits),
                    ("misses", "Remote reads not answered (absent, failed or past the deadline)", t.misses),
                    ("read_bytes", "Bytes fetched from the remote tier", t.bytes_read),
                    ("written_bytes", "Bytes stored in the remote tier", t.bytes_written),
                    ("stored", "Chunks stored in the remote tier", t.stored),
                    ("already_present", "Stores that found the chunk present", t.already_present),
                    ("quota_rejections", "Stores skipped for the tenant quota", t.quota_rejections),
                    ("corrupt", "Remote values dropped for a failed check", t.corrupt),
                    ("errors", "Remote calls failed or past the deadline", t.errors)):
                yield CounterMetricFamily(f"kvstore_remote_{name}", help_, value=value)
            yield GaugeMetricFamily("kvstore_remote_throughput_bytes_per_second",
                                    "EWMA of the measured throughput to the remote tier", value=t.throughput_bytes_per_s)
            u = self._parts.uploader.stats()
            yield GaugeMetricFamily("kvstore_remote_upload_queue_depth", "Chunks waiting for upload", value=u.queued)
            for name, help_, value in (
                    ("upload_skipped", "Uploads skipped because the queue was full", u.skipped_queue_full),
                    ("uploaded", "Chunks uploaded", u.uploaded),
                    ("upload_deduplicated", "Uploads not needed: already in the remote tier", u.deduplicated),
                    ("upload_retried_batches", "Upload batches retried after a remote failure", u.retried_batches)):
                yield CounterMetricFamily(f"kvstore_remote_{name}", help_, value=value)
            levels = CounterMetricFamily("kvstore_remote_level_decisions", "Codec levels chosen by the adaptive "
                                         "controller", labels=["purpose", "level"])
            for key, n in sorted(self._parts.controller.snapshot()["decisions"].items()):
                purpose, _, level = key.partition(":")
                levels.add_metric([purpose, level], n)
            yield levels
        if self._publisher is not None:
            e = self._publisher.stats()
            for name, value in asdict(e).items():
                yield CounterMetricFamily(f"kvstore_events_{name}", f"KV events publisher: {name.replace('_', ' ')}",
                                          value=value)
