"""Fixtures that run a REAL kvstore daemon process (no mocks of the storage).

``daemon_factory(**opts)`` starts ``python -m kvstore.cli.daemon serve`` on a free loopback
port (or a unix socket) with a ``tmp_path`` data directory and small capacities, waits until
gRPC health says SERVING, and kills it at teardown. Module-scoped ``daemon`` and
``auth_daemon`` are shared by tests that only need a running daemon (each test uses its own
namespace, so tests do not see each other's chunks).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from integration.helpers import ADMIN_TOKEN, TOKENS, free_port  # noqa: F401 (tests/ is on sys.path via this conftest)

STARTUP_TIMEOUT_S = 30.0


@dataclass
class DaemonProcess:
    data_dir: Path
    listen: str
    log_path: Path
    settings: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return self.listen

    def start(self) -> "DaemonProcess":
        cmd = [sys.executable, "-m", "kvstore.cli.daemon", "serve", "--data-dir", str(self.data_dir),
               "--listen", self.listen]
        for s in self.settings:
            cmd += ["--set", s]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.wait_serving()
        return self

    def wait_serving(self) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with grpc.insecure_channel(self.listen) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"daemon not SERVING after {STARTUP_TIMEOUT_S}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 15) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()

    def stop(self) -> int:
        return self.kill(signal.SIGTERM)

    def restart(self) -> "DaemonProcess":
        self.stop()
        return self.start()


SMALL = ["dram.capacity_bytes=96MiB", "disk.capacity_bytes=512MiB", 'metrics.listen=""', "server.worker_threads=4",
         "server.shutdown_grace_s=1"]


def _tokens_file(path: Path) -> Path:
    lines = ["[tokens]"]
    for tok, e in TOKENS.items():
        lines.append(f'"{tok}" = {{ tenant = "{e["tenant"]}", admin = {str(e["admin"]).lower()} }}')
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def daemon_factory(tmp_path_factory):
    started: list[DaemonProcess] = []

    def make(*, unix: bool = False, auth: bool = False, settings: tuple[str, ...] = (),
             data_dir: Path | None = None) -> DaemonProcess:
        base = tmp_path_factory.mktemp("kvstore")
        listen = f"unix:{base}/kvstore.sock" if unix else f"127.0.0.1:{free_port()}"
        extra = list(SMALL) + list(settings)
        if auth:
            extra.append(f'auth.tokens_file="{_tokens_file(base / "tokens.toml")}"')
        d = DaemonProcess(data_dir or base / "data", listen, base / "daemon.log", extra)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()  # SIGTERM: the daemon removes its shared-memory arena


def _module_daemon(tmp_path_factory, auth: bool):
    base = tmp_path_factory.mktemp("kvstore-shared")
    extra = list(SMALL)
    if auth:
        extra.append(f'auth.tokens_file="{_tokens_file(base / "tokens.toml")}"')
    d = DaemonProcess(base / "data", f"127.0.0.1:{free_port()}", base / "daemon.log", extra).start()
    return d


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = _module_daemon(tmp_path_factory, auth=False)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def auth_daemon(tmp_path_factory):
    d = _module_daemon(tmp_path_factory, auth=True)
    yield d
    d.stop()
