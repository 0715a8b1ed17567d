"""A real Redis Cluster on loopback for tests and benchmarks: N masters with R replicas each.

``LocalRedisCluster(tmpdir).start()`` runs ``redis-server --cluster-enabled yes`` on free
ports, joins them with ``redis-cli --cluster create --cluster-replicas R --cluster-yes`` and
waits until every node reports ``cluster_state:ok``. Fault helpers: ``kill`` (SIGKILL a node),
``pause``/``resume`` (SIGSTOP/SIGCONT), ``restart`` (same port and nodes.conf, so it rejoins),
``masters()`` (ports of the current masters, from CLUSTER NODES). ``stop`` ends every process
it started. Needs ``redis-server`` and ``redis-cli`` on PATH (``available()``).

``host`` is the address the nodes bind to and announce (loopback by default); ``wrap`` turns
a ``redis-server`` argv into the command that runs it elsewhere, e.g. inside a network
namespace (``kvstore_testing.netns.ThrottledNetns.wrap``, with its ``inner_ip`` as ``host``).
``redis-cli`` always runs here and dials ``host``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

#: Milliseconds before a silent master is failed over; short so fault tests finish quickly.
NODE_TIMEOUT_MS = 1000
#: Seconds to wait for the cluster to form or heal.
READY_TIMEOUT_S = 30.0
#: Cluster bus port = client port + this (fixed by Redis).
BUS_OFFSET = 10000


def available() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def _free(port: int) -> bool:
    for p in (port, port + BUS_OFFSET):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def free_ports(n: int, start: int = 21000) -> list[int]:
    base = start + (os.getpid() * 37) % 8000
    out: list[int] = []
    p = base
    while len(out) < n:
        if _free(p):
            out.append(p)
        p += 1
        if p >= 55000 - BUS_OFFSET:
            p = start
    return out


class LocalRedisCluster:
    def __init__(self, root: Path, masters: int = 3, replicas: int = 1, password: str | None = None,
                 host: str = "127.0.0.1", wrap: Callable[[list[str]], list[str]] | None = None) -> None:
        self.root = Path(root)
        self.host = host
        self._wrap = wrap or (lambda argv: argv)
        self.n = masters * (1 + replicas)
        self.masters_n, self.replicas = masters, replicas
        self.password = password
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def nodes(self) -> list[str]:
        return [f"{self.host}:{p}" for p in self.ports]

    def start(self) -> "LocalRedisCluster":
        self.ports = free_ports(self.n)
        for p in self.ports:
            self._spawn(p)
        for p in self.ports:
            self._wait_ping(p)
        cmd = ["redis-cli", *self._auth(), "--cluster", "create", *self.nodes,
               "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        self.wait_ok()
        return self

    def _auth(self) -> list[str]:
        return ["-a", self.password, "--no-auth-warning"] if self.password else []

    def _spawn(self, port: int) -> None:
        d = self.root / str(port)
        d.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(port), "--bind", self.host, "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--dir", str(d), "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--protected-mode", "no", "--cluster-replica-validity-factor", "0", "--logfile", str(d / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        self.procs[port] = subprocess.Popen(self._wrap(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cli(self, port: int, *args: str, timeout: float = 5.0) -> str:
        r = subprocess.run(["redis-cli", *self._auth(), "-h", self.host, "-p", str(port), *args], capture_output=True, text=True,
                           timeout=timeout)
        return r.stdout

    def _wait_ping(self, port: int) -> None:
        end = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < end:
            try:
                if self.cli(port, "ping", timeout=1).strip() == "PONG":
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {port} did not start; see {self.root / str(port) / 'redis.log'}")

    def wait_ok(self, ports: list[int] | None = None, timeout_s: float = READY_TIMEOUT_S) -> None:
        ports = ports or [p for p in self.ports if self.procs[p].poll() is None]
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                if all("cluster_state:ok" in self.cli(p, "cluster", "info", timeout=1) for p in ports) and \
                        all(self._synced(p) for p in ports):
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def _synced(self, port: int) -> bool:
        """A replica has finished its initial sync (else it could not take over its master)."""
        info = self.cli(port, "info", "replication", timeout=1)
        return "role:slave" not in info or "master_link_status:up" in info

    def masters(self) -> list[int]:
        for p in self.ports:
            if self.procs[p].poll() is not None:
                continue
            try:
                out = self.cli(p, "cluster", "nodes", timeout=1)
            except subprocess.TimeoutExpired:
                continue
            rows = [line.split() for line in out.splitlines() if line.strip()]
            return sorted(int(r[1].split("@")[0].rsplit(":", 1)[1]) for r in rows
                          if "master" in r[2] and "fail" not in r[2])
        return []

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait()

    def pause(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGCONT)

    def restart(self, port: int) -> None:
        if self.procs[port].poll() is None:
            self.kill(port)
        self._spawn(port)
        self._wait_ping(port)

    def stop(self) -> None:
        for p, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()

    def __enter__(self) -> "LocalRedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
