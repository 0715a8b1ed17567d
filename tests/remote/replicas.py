"""Helpers for tests with real daemons on a Redis Cluster (replicas sharing the remote tier)."""

from __future__ import annotations

import time

import grpc

from kvstore_testing.daemon import spawn_daemon
from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc

#: Deadline of remote calls in the fault tests (as tests/remote/conftest.py).
TEST_TIMEOUT_MS = 500

SECRET = "daemons-test-secret-0123456789"
TOK_X, TOK_Y = "tok-x-0123456789abcdef", "tok-y-0123456789abcdef"
#: How long A's uploads may take to reach the cluster on a loaded 2-core box.
UPLOAD_WAIT_S = 60.0
#: Remote deadline of the replicas in the hit tests.
HIT_TIMEOUT_MS = 3000
#: A miss must come back within this on a dead or paused cluster: the remote deadline (two
#: bounded calls: the existence check and the fetch) plus the RPC and a loaded box's slack.
MISS_BOUND_S = 2 * TEST_TIMEOUT_MS / 1000 + 2.0


def remote_settings(cluster, *extra: str) -> list[str]:
    nodes = "[" + ", ".join(f'"{n}"' for n in cluster.nodes) + "]"
    return ["remote.enabled=true", f"remote.nodes={nodes}", f"remote.key_secret={SECRET}",
            f"remote.timeout_ms={TEST_TIMEOUT_MS}", "remote.retry_backoff_s=0.2", "remote.min_quality=lossless",
            "metrics.listen=", "disk.capacity_bytes=2GiB", "dram.capacity_bytes=512MiB", *extra]


def replica(cluster, tmp_path, name: str, *extra: str, timeout_ms: int = TEST_TIMEOUT_MS,
            start_timeout_s: float = 60.0):
    """A daemon on the cluster; tenant X's token may also use the same-host path."""
    base = tmp_path / name
    base.mkdir(parents=True, exist_ok=True)
    tokens = base / "tokens.toml"
    tokens.write_text("[tokens]\n"
                      f'"{TOK_X}" = {{ tenant = "tenant-x", admin = true, local_path = true }}\n'
                      f'"{TOK_Y}" = {{ tenant = "tenant-y", admin = false }}\n')
    return spawn_daemon(base_dir=base, start_timeout_s=start_timeout_s, settings=remote_settings(cluster, *extra, f'auth.tokens_file="{tokens}"',
                                                                  f"remote.timeout_ms={timeout_ms}"))


def stats(daemon):
    """The daemon's GetStats (admin token)."""
    with grpc.insecure_channel(daemon.addr) as ch:
        return admin_pb2_grpc.AdminStub(ch).GetStats(admin_pb2.GetStatsRequest(), timeout=10,
                                                     metadata=(("authorization", f"Bearer {TOK_X}"),))


def uploads(daemon) -> int:
    r = stats(daemon).remote
    return r.uploaded + r.upload_deduplicated


def wait_uploaded(daemon, n: int, before: int) -> None:
    """Waits until the daemon's uploader has stored (or found present) ``n`` more chunks
    than ``before`` (``uploads()`` before the store)."""
    deadline = time.monotonic() + UPLOAD_WAIT_S
    while time.monotonic() < deadline:
        r = stats(daemon).remote
        if r.uploaded + r.upload_deduplicated >= before + n and not r.upload_queued:
            return
        time.sleep(0.1)
    raise AssertionError(f"uploads did not finish: {stats(daemon).remote}")
