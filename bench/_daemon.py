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


def serve_raw_grpc(port: int, ready, service: str, handlers: dict, options=()) -> None:
    """Runs a bare grpc.aio server (uvloop, no interceptor) with ``handlers`` until killed:
    the transport ceiling the benchmarks print beside kvstore. Sets ``ready`` once serving.
    Meant as a ``multiprocessing.Process`` target."""
    import asyncio

    import uvloop

    async def main():
        server = grpc.aio.server(options=list(options))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    uvloop.install()
    asyncio.run(main())
