"""Starts a real kvstore daemon for the benchmarks (a subprocess on a free loopback port)."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, *settings: str) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="kvstore-bench-")
        self.addr = f"127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "kvstore.cli.daemon", "serve", "--data-dir", f"{self.dir.name}/data",
               "--listen", self.addr, "--set", 'metrics.listen=""', "--set", "log.level=WARNING"]
        for s in settings:
            cmd += ["--set", s]
        self.proc = subprocess.Popen(cmd)
        with grpc.insecure_channel(self.addr) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for _ in range(600):
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    time.sleep(0.05)
        raise RuntimeError("daemon did not start")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.dir.cleanup()
