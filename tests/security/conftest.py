"""Fixtures of the tenant-boundary tests: a real daemon with tokens of every kind of right."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from kvstore_wire._proto.kvstore.v1 import admin_pb2, data_pb2, local_pb2

#: token -> (tenant, admin, local_path)
ALICE = "alice-stream-0123456789abcdef"    # stream only
BOB = "bob-stream-0123456789abcdefgh"      # stream only, another tenant
ENGINE = "engine-local-0123456789abcdef"   # stream + local_path
OPS = "ops-admin-0123456789abcdefghij"     # stream + admin
ROOT = "root-all-0123456789abcdefghijk"    # every right
SECURITY_TOKENS = {ALICE: ("alice", False, False), BOB: ("bob", False, False), ENGINE: ("engine", False, True),
                   OPS: ("ops", True, False), ROOT: ("root", True, True)}


def write_tokens(path: Path, extra: str = "") -> Path:
    lines = ["[tokens]"]
    for tok, (tenant, admin, local) in SECURITY_TOKENS.items():
        lines.append(f'"{tok}" = {{ tenant = "{tenant}", admin = {str(admin).lower()}, '
                     f'local_path = {str(local).lower()} }}')
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


#: Small capacities and no metrics port (as tests/conftest.py): many daemons share a small machine.
SMALL = ["dram.capacity_bytes=96MiB", "disk.capacity_bytes=512MiB", 'metrics.listen=""', "server.worker_threads=4",
         "server.shutdown_grace_s=1"]


def md(token: str | None):
    return (("authorization", f"Bearer {token}"),) if token else ()


def kv(tokens: int, seed: int):
    """Random fp16 KV of ``tokens`` tokens in the small namespace shape of the tenant tests
    (4 layers, K and V, 2 KV heads, head_dim 32)."""
    import numpy as np

    return np.random.default_rng(seed).standard_normal((4, 2, tokens, 2, 32)).astype(np.float16)


def all_methods() -> list[tuple[str, bool, bool]]:
    """(full method name, client streaming, server streaming) of every kvstore RPC, from the protos."""
    out = []
    for mod in (data_pb2, local_pb2, admin_pb2):
        for svc in mod.DESCRIPTOR.services_by_name.values():
            for m in svc.methods:
                out.append((f"/{svc.full_name}/{m.name}", m.client_streaming, m.server_streaming))
    return out


def raw_call(ch: grpc.Channel, method: str, client_streaming: bool, server_streaming: bool, payload: bytes,
             metadata=(), timeout: float = 10.0) -> grpc.StatusCode:
    """Sends ``payload`` as the raw request bytes (the stream: one message) and returns the final status."""
    try:
        if client_streaming:
            ch.stream_unary(method)(iter([payload]), metadata=metadata, timeout=timeout)
        elif server_streaming:
            for _ in ch.unary_stream(method)(payload, metadata=metadata, timeout=timeout):
                pass
        else:
            ch.unary_unary(method)(payload, metadata=metadata, timeout=timeout)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def sec_daemon(tmp_path_factory):
    from kvstore_testing.daemon import DaemonProcess
    from kvstore_testing.ports import free_port

    base = tmp_path_factory.mktemp("kvstore-sec")
    tokens = write_tokens(base / "tokens.toml")
    d = DaemonProcess(base / "data", f"127.0.0.1:{free_port()}", base / "daemon.log",
                      list(SMALL) + [f'auth.tokens_file="{tokens}"']).start()
    yield d
    d.stop()
