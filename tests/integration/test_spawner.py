"""The one real-daemon spawner (``kvstore_testing.daemon``) the fixtures, benchmarks and demo use."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore_testing.daemon import DaemonStartError, spawn_daemon, wait_serving
from kvstore_testing.ports import free_port

from .helpers import TOKENS

QUICK = ['metrics.listen=""', "dram.capacity_bytes=32MiB", "disk.enabled=false", "server.shutdown_grace_s=1"]


def _serving(addr: str) -> bool:
    with grpc.insecure_channel(addr) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return r.status == health_pb2.HealthCheckResponse.SERVING


def test_context_manager_owns_its_temp_dir_and_process():
    with spawn_daemon(settings=QUICK) as d:
        assert d.addr.startswith("127.0.0.1:") and _serving(d.addr)
        base, proc = d.owned_dir, d.proc
        assert base is not None and (base / "daemon.log").is_file()
    assert proc.returncode == 0          # SIGTERM: a clean shutdown
    assert not base.exists()             # the directory it made is gone


def test_unix_socket_restart_kill_and_auth(tmp_path):
    d = spawn_daemon(base_dir=tmp_path, unix=True, settings=QUICK, tokens=TOKENS)
    try:
        assert d.addr == f"unix:{tmp_path}/kvstore.sock" and _serving(d.addr)
        assert (tmp_path / "tokens.toml").is_file()
        pid = d.proc.pid
        d.restart()
        assert d.proc.pid != pid and _serving(d.addr)
        assert d.kill() == -signal.SIGKILL and not d.running
        d.start()                        # the same address, data dir and log again
        assert _serving(d.addr)
    finally:
        d.close()
    assert tmp_path.exists()             # a caller's directory is left in place
    assert d.log()                       # the log of all starts is kept


def test_bad_setting_fails_fast_with_the_log(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(DaemonStartError, match="exited with status 2") as e:
        spawn_daemon(base_dir=tmp_path, settings=[*QUICK, "dram.no_such_field=1"])
    assert "no_such_field" in str(e.value)   # the daemon's own message, quoted from its log
    assert time.monotonic() - t0 < 20


def test_wait_serving_times_out_on_a_closed_port():
    with pytest.raises(DaemonStartError, match="no SERVING kvstore daemon"):
        wait_serving(f"127.0.0.1:{free_port()}", timeout_s=0.5)
