"""Write and read paths: uploader dedup and bounded queue, the adaptive level on a slow and a
fast link, the lossless floor, and a fetch that decodes back bit-exact."""

from __future__ import annotations

import time

import numpy as np

from kvstore.config import RemoteConfig, TierCodec
from kvstore_testing.codec_data import synthetic_kv
from kvstore.tiers.remote import AdaptiveController, ThroughputMeter, build_remote
from kvstore.types import ChunkId, ChunkMeta, DType, Encoding
from kvstore_wire.keys import Namespace
import kvstore_native as native

from .conftest import make_chunk, remote_config, ready

NS = Namespace("synthetic", DType.FLOAT16, 4, 3, 64, chunk_tokens=64, tenant="t")
GBIT = 1e9 / 8


def _kv_chunk(seed: int):
    arr = synthetic_kv(layers=4, tokens=64, heads=3, head_dim=64, seed=seed)
    cid = ChunkId(NS.namespace_id + np.random.default_rng(seed).bytes(32))
    return cid, ChunkMeta(64, Encoding.RAW, arr.nbytes, native.crc32c(arr)), arr


def test_uploader_dedups_and_counts_a_full_queue(redis_cluster, rng, ns):
    parts = ready(build_remote(remote_config(redis_cluster, upload_queue_chunks=4)))
    try:
        chunks = [make_chunk(rng, ns, tokens=2) for _ in range(4)]
        for c in chunks:
            assert parts.uploader.submit(*c)
        assert parts.uploader.flush(30)
        for c in chunks:
            parts.uploader.submit(*c)
        assert parts.uploader.flush(30)
        st = parts.uploader.stats()
        assert st.uploaded == 4 and st.deduplicated == 4
        accepted = sum(parts.uploader.submit(*make_chunk(rng, ns, tokens=2)) for _ in range(40))
        assert parts.uploader.flush(30)
        st = parts.uploader.stats()
        assert st.skipped_queue_full == 40 - accepted > 0
    finally:
        parts.close()


def test_controller_picks_smaller_levels_on_a_slower_link():
    cfg = remote_config(type("C", (), {"nodes": ["127.0.0.1:1"]})(), load_budget_us_per_token=100)
    tok_bytes = NS.token_bytes
    picks = {}
    for gbit in (0.1, 1, 10, 25):
        meter = ThroughputMeter(1.0, 1.0)
        meter.sample(64 * 1024 * 1024, 64 * 1024 * 1024 / (gbit * GBIT))  # one rate-limited transfer
        ctl = AdaptiveController(cfg, meter)
        picks[gbit] = ctl.choose(NS.namespace_id, 256, 256 * tok_bytes * 40).level
    order = [TierCodec.LOSSLESS, TierCodec.NEAR_LOSSLESS, TierCodec.DEFAULT, TierCodec.AGGRESSIVE]
    ranks = [order.index(picks[g]) for g in (0.1, 1, 10, 25)]
    assert ranks == sorted(ranks, reverse=True) and ranks[0] > ranks[-1], picks
    assert picks[25] == TierCodec.LOSSLESS and picks[0.1] == TierCodec.AGGRESSIVE
    floor = AdaptiveController(cfg, meter, floor_for=lambda ns: TierCodec.LOSSLESS)
    meter.sample(64 * 1024 * 1024, 10.0)  # now a very slow link
    assert floor.choose(NS.namespace_id, 256, 256 * tok_bytes * 40).level == TierCodec.LOSSLESS


def test_slow_link_uploads_lossy_with_floor_respected_and_fetch_decodes(redis_cluster):
    slow = remote_config(redis_cluster, initial_throughput_bytes_per_s=0.05 * GBIT, throughput_ewma_alpha=1e-6,
                         load_budget_us_per_token=30)
    parts = ready(build_remote(slow, resolve=lambda ns: NS))
    floored = ready(build_remote(slow.model_copy(update={"min_quality": TierCodec.LOSSLESS}), resolve=lambda ns: NS))
    try:
        (c1, m1, a1), (c2, m2, a2) = _kv_chunk(1), _kv_chunk(2)
        parts.uploader.submit(c1, m1, a1)
        floored.uploader.submit(c2, m2, a2)
        assert parts.uploader.flush(60) and floored.uploader.flush(60)
        v1, v2 = parts.tier.get_values([c1, c2])
        assert v1.level != TierCodec.LOSSLESS and v1.meta.encoding == Encoding.CODEC
        assert v2.level == TierCodec.LOSSLESS
        assert len(v1.payload) < len(v2.payload) < a2.nbytes
        got = floored.reader.fetch_prefix([c2, c1, ChunkId(bytes(64))], num_tokens=64)
        assert [f.cid for f in got] == [c2, c1]
        assert bytes(got[0].payload) == a2.tobytes()          # lossless: bit-exact
        assert got[0].meta.encoding == Encoding.RAW and len(got[1].payload) == a1.nbytes
        snap = parts.controller.snapshot()["decisions"]
        assert any(k.startswith("upload:") and not k.endswith("lossless") for k in snap)
    finally:
        parts.close()
        floored.close()


def test_fast_link_uploads_lossless_and_a_small_companion(redis_cluster):
    fast = remote_config(redis_cluster, initial_throughput_bytes_per_s=25 * GBIT, throughput_ewma_alpha=1e-6,
                         load_budget_us_per_token=1000)
    parts = ready(build_remote(fast, resolve=lambda ns: NS))
    try:
        cid, meta, arr = _kv_chunk(3)
        parts.uploader.submit(cid, meta, arr)
        assert parts.uploader.flush(60)
        (primary,), (small,) = parts.tier.get_values([cid]), parts.tier.get_values([cid], small=True)
        assert primary.level == TierCodec.LOSSLESS and not primary.small
        assert small.level == TierCodec.AGGRESSIVE and small.small
    finally:
        parts.close()


def test_throttled_link_is_measured_and_ships_smaller_levels(redis_cluster):
    """A real rate-limited transfer (proxy at 20 MB/s in front of every node) against the
    unthrottled cluster: the meter learns each link and the uploader picks the level from it."""
    from kvstore_testing.throttle import ThrottledCluster
    from kvstore.tiers.remote.link import RedisLink
    proxy = ThrottledCluster(redis_cluster, bytes_per_s=20e6)
    # Budget 100 us/token: a 64-token chunk (98 KB RAW) fits lossless only on the fast link.
    base = dict(throughput_ewma_alpha=0.5, load_budget_us_per_token=100, timeout_ms=5000,
                initial_throughput_bytes_per_s=1e9)
    slow_cfg = remote_config(redis_cluster, nodes=proxy.nodes, **base)
    slow = ready(build_remote(slow_cfg, resolve=lambda ns: NS, link=RedisLink(slow_cfg, address_remap=proxy.remap)))
    fast = ready(build_remote(remote_config(redis_cluster, **base), resolve=lambda ns: NS))
    try:
        for parts in (slow, fast):   # learn the link from a few large transfers
            blob = np.random.default_rng(0).bytes(1 << 20)
            for i in range(4):
                cid = ChunkId(bytes(31) + b"\x01" + np.random.default_rng(i + 7).bytes(32))
                parts.tier.put(cid, ChunkMeta(1, Encoding.CODEC, len(blob), native.crc32c(blob)), blob)
                parts.tier.get(cid)
        assert slow.tier.meter.bytes_per_s < 40e6 < fast.tier.meter.bytes_per_s
        (c1, m1, a1), (c2, m2, a2) = _kv_chunk(11), _kv_chunk(12)
        slow.uploader.submit(c1, m1, a1)
        fast.uploader.submit(c2, m2, a2)
        assert slow.uploader.flush(60) and fast.uploader.flush(60)
        v_slow, v_fast = fast.tier.get_values([c1, c2])
        order = [TierCodec.LOSSLESS, TierCodec.NEAR_LOSSLESS, TierCodec.DEFAULT, TierCodec.AGGRESSIVE]
        assert order.index(v_slow.level) > order.index(v_fast.level), (v_slow.level, v_fast.level)
        assert len(v_slow.payload) < len(v_fast.payload)
    finally:
        slow.close()
        fast.close()
        proxy.close()


def test_metrics_and_status(redis_cluster, rng, ns):
    from prometheus_client import CollectorRegistry, generate_latest
    from kvstore.remote_metrics import RemoteCollector
    parts = ready(build_remote(remote_config(redis_cluster)))
    try:
        c = make_chunk(rng, ns, tokens=2)
        parts.uploader.submit(*c)
        assert parts.uploader.flush(30)
        parts.tier.get(c[0])
        col = RemoteCollector(parts)
        reg = CollectorRegistry()
        reg.register(col)
        text = generate_latest(reg).decode()
        assert "kvstore_remote_hits_total 1.0" in text and "kvstore_remote_upload_queue_depth 0.0" in text
        st = col.status()
        assert st["remote"]["hit_rate"] == 1.0 and st["upload"]["uploaded"] == 1
    finally:
        parts.close()


def test_controller_calibrates_every_level_on_the_first_real_chunk(redis_cluster):
    """The uploader measures each level's size ratio and decode rate on its first RAW chunk
    (priors replaced); a reader that only fetches calibrates on its first decoded chunk, in
    the background."""
    cfg = remote_config(redis_cluster, load_budget_us_per_token=1000)
    up = ready(build_remote(cfg, resolve=lambda ns: NS))
    rd = ready(build_remote(cfg, resolve=lambda ns: NS))
    try:
        assert not up.controller.calibrated
        cid, meta, arr = _kv_chunk(7)
        up.uploader.submit(cid, meta, arr)
        assert up.uploader.flush(60)
        snap = up.controller.snapshot()
        assert snap["calibrated"]
        sizes = [snap["ratio"][lv.value] for lv in (TierCodec.LOSSLESS, TierCodec.NEAR_LOSSLESS,
                                                     TierCodec.DEFAULT, TierCodec.AGGRESSIVE)]
        assert 0 < sizes[-1] < sizes[1] < sizes[0] < 1.1, snap   # measured on this chunk
        assert all(v > 0 for v in snap["decode_bytes_per_s"].values())
        got = rd.reader.fetch_prefix([cid], 64)
        assert len(got) == 1 and bytes(memoryview(got[0].payload).cast("B")) == arr.tobytes()
        deadline = time.monotonic() + 30
        while not rd.controller.calibrated and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rd.controller.calibrated
    finally:
        up.close()
        rd.close()


def test_fp32_namespaces_start_from_fp32_priors():
    """Before any measurement the model takes the priors of the namespace's element size:
    at fp32 the lossy levels are half as large and decode faster than lossless."""
    from kvstore.tiers.remote.adaptive import PRIOR_DECODE_BYTES_PER_S_FP32, PRIOR_RATIO, PRIOR_RATIO_FP32
    cfg = RemoteConfig(load_budget_us_per_token=0.001)
    fp32 = AdaptiveController(cfg, ThroughputMeter(GBIT, 0.2), element_bytes=lambda ns: 4)
    fp16 = AdaptiveController(cfg, ThroughputMeter(GBIT, 0.2), element_bytes=lambda ns: 2)
    raw = 256 * 23040 * 2
    assert fp32.choose(b"\0" * 32, 256, raw).level != TierCodec.LOSSLESS   # lossless decodes slowly at fp32
    assert fp32.snapshot()["ratio"] == {k.value: v for k, v in PRIOR_RATIO_FP32.items()}
    assert fp32.snapshot()["decode_bytes_per_s"]["near-lossless"] == PRIOR_DECODE_BYTES_PER_S_FP32[
        TierCodec.NEAR_LOSSLESS]
    fp16.choose(b"\0" * 32, 256, raw)
    assert fp16.snapshot()["ratio"] == {k.value: v for k, v in PRIOR_RATIO.items()}
