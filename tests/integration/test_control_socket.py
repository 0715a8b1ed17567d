"""The same-host control socket against real daemons (``kvstore.server.control``).

Same-host clients send ReserveWrite, CommitWrite, LeaseRead and Release as frames on a unix
socket beside the arena instead of gRPC calls. What must hold: a round trip through it is
bit-exact and really goes through it; nothing reaches a servicer without the ticket of an
Attach; hostile frames (no HELLO, a wrong ticket, an oversize length, an unknown method,
garbage bodies) get a status and never hurt the daemon; a tenant's ticket cannot touch
another tenant's leases; connections are bounded per tenant and come back when a client
dies; the client falls back to gRPC when the socket is off, refused or gone (restart).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest

from kvstore.server.control import HEADER, HELLO_TIMEOUT_S
from kvstore_client import KVStoreClient, Namespace
from kvstore_client._control import ControlRpcError, _read_frame
from kvstore_testing.daemon import spawn_daemon
from kvstore_wire._proto.kvstore.v1 import local_pb2, local_pb2_grpc
from kvstore_wire.types import Encoding

NS = dict(model="control-test", dtype="float16", num_layers=4, num_kv_heads=2, head_dim=32, chunk_tokens=64)
CHUNK = 4 * 2 * 64 * 2 * 32 * 2
SETTINGS = ["dram.capacity_bytes=64MiB", "disk.enabled=false", 'metrics.listen=""', "server.shutdown_grace_s=1"]
ALICE = "tok-alice-local-0123456789abcdef"
BOB = "tok-bob-local-0123456789abcdefgh"


def kv(seed: int, chunks: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, 2, 64 * chunks, 2, 32)).astype(np.float16)


def tokens(seed: int, chunks: int = 3) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed + 7).integers(0, 30000, 64 * chunks)]


def frame(call_id: int, code: int, body: bytes = b"") -> bytes:
    return HEADER.pack(len(body) + 5, call_id, code) + body


def hello(path: str, ticket: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    s.sendall(frame(0, 0, ticket))
    cid, code, body = _read_frame(s)
    assert (cid, code) == (0, 0), body
    return s


def closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(10)
    try:
        while True:
            if not s.recv(4096):
                return True
    except (ConnectionError, socket.timeout):
        return False


def attach(addr: str, md=()) -> local_pb2.AttachResponse:
    with grpc.insecure_channel(addr) as ch:
        return local_pb2_grpc.LocalDataStub(ch).Attach(local_pb2.AttachRequest(), metadata=md, timeout=10)


@pytest.fixture
def daemon(tmp_path):
    d = spawn_daemon(base_dir=tmp_path, settings=SETTINGS)
    yield d
    d.stop()


@pytest.fixture
def auth_daemon(tmp_path):
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text("[tokens]\n"
                           f'"{ALICE}" = {{ tenant = "alice", local_path = true }}\n'
                           f'"{BOB}" = {{ tenant = "bob", local_path = true }}\n')
    d = spawn_daemon(base_dir=tmp_path, settings=[*SETTINGS, f'auth.tokens_file="{tokens_file}"',
                                                  "quotas.max_control_connections=2"])
    yield d
    d.stop()


def test_round_trip_goes_through_the_socket_and_is_bit_exact(daemon):
    with KVStoreClient(daemon.addr, Namespace(**NS), local=True) as c:
        ch = c._core.control
        assert ch is not None and ch.alive
        mode = os.stat(ch.path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        before = next(ch._ids)
        x, toks = kv(1), tokens(1)
        assert c.store(toks, x) == 3
        n, out = c.retrieve(toks)
        assert n == 64 * 3 and np.array_equal(out.view(np.uint16), x.view(np.uint16))
        assert next(ch._ids) > before + 2     # ReserveWrite, CommitWrite, LeaseRead went this way


def test_the_socket_is_removed_at_shutdown(tmp_path):
    d = spawn_daemon(base_dir=tmp_path, settings=SETTINGS)
    path = attach(d.addr).control_socket
    assert path and os.path.exists(path)
    d.stop()
    assert not os.path.exists(path)


def test_hostile_frames_get_a_status_and_the_daemon_stays_up(daemon):
    a = attach(daemon.addr)
    path = a.control_socket
    # a wrong ticket, and a call before any HELLO
    for first in (frame(0, 0, b"\x00" * 32), frame(9, 4, local_pb2.ReleaseRequest(lease_ids=[1]).SerializeToString())):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(path)
        s.sendall(first)
        _, code, body = _read_frame(s)
        assert code == grpc.StatusCode.UNAUTHENTICATED.value[0] and b"HELLO" in body
        assert closed_by_peer(s)
    # an oversize HELLO, and an oversize frame after it
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    s.sendall(HEADER.pack(1 << 30, 0, 0))
    _, code, _ = _read_frame(s)
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and closed_by_peer(s)
    s = hello(path, a.control_ticket)
    s.sendall(HEADER.pack(0xFFFFFFFF, 5, 1))
    cid, code, body = _read_frame(s)
    assert (cid, code) == (5, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]) and b"max_message_bytes" in body
    assert closed_by_peer(s)
    # a length shorter than the header itself
    s = hello(path, a.control_ticket)
    s.sendall(HEADER.pack(2, 6, 1))
    cid, code, _ = _read_frame(s)
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and closed_by_peer(s)
    # an unknown method and garbage bodies: a status each, the connection stays usable
    s = hello(path, a.control_ticket)
    s.sendall(frame(7, 99, b"abc"))
    assert _read_frame(s)[:2] == (7, grpc.StatusCode.UNIMPLEMENTED.value[0])
    for method in (1, 2, 3, 4):
        s.sendall(frame(10 + method, method, b"\xff\xff\xff\xff\x0f"))
        cid, code, body = _read_frame(s)
        assert (cid, code) == (10 + method, grpc.StatusCode.INVALID_ARGUMENT.value[0]), body
    s.sendall(frame(20, 3, local_pb2.LeaseReadRequest(namespace_id=b"\x01" * 32, keys=[b"k" * 32]).SerializeToString()))
    cid, code, body = _read_frame(s)
    assert (cid, code) == (20, grpc.StatusCode.NOT_FOUND.value[0]), body
    s.sendall(frame(21, 4, local_pb2.ReleaseRequest(lease_ids=[12345]).SerializeToString()))
    cid, code, body = _read_frame(s)
    assert (cid, code) == (21, 0) and local_pb2.ReleaseResponse.FromString(body) is not None
    s.close()
    # a connection that never says HELLO is closed after the hello timeout
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    t0 = time.monotonic()
    s.settimeout(HELLO_TIMEOUT_S + 10)
    _, code, _ = _read_frame(s)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and time.monotonic() - t0 < HELLO_TIMEOUT_S + 5
    with KVStoreClient(daemon.addr, Namespace(**NS), local=True) as c:   # still serving
        assert c.store(tokens(2), kv(2)) == 3


def test_a_client_that_reads_no_answers_only_stalls_itself(daemon):
    a = attach(daemon.addr)
    s = hello(a.control_socket, a.control_ticket)
    body = local_pb2.ReleaseRequest(lease_ids=list(range(1, 500))).SerializeToString()
    s.setblocking(False)
    sent = 0
    try:
        for i in range(20000):          # until the daemon stops reading (its call slots are full)
            s.send(frame(i + 1, 4, body))
            sent += 1
    except BlockingIOError:
        pass
    assert sent < 20000
    with KVStoreClient(daemon.addr, Namespace(**NS), local=True) as c:
        assert c.store(tokens(3), kv(3)) == 3
    s.close()


def test_tickets_stand_for_their_tenant(auth_daemon):
    a_md = (("authorization", f"Bearer {ALICE}"),)
    with KVStoreClient(auth_daemon.addr, Namespace(**NS), token=ALICE) as alice, \
            KVStoreClient(auth_daemon.addr, Namespace(**NS), token=BOB) as bob:
        assert alice._core.control is not None and bob._core.control is not None
        with grpc.insecure_channel(auth_daemon.addr) as ch:
            r = local_pb2_grpc.LocalDataStub(ch).ReserveWrite(local_pb2.ReserveWriteRequest(
                namespace_id=alice.namespace_id, chunks=[local_pb2.ChunkToWrite(
                    num_tokens=64, encoding=Encoding.RAW, payload_bytes=CHUNK)]), metadata=a_md)
        # bob's ticket names alice's lease: NOT_FOUND, and the lease stays alice's
        with pytest.raises(ControlRpcError) as e:
            bob._rpc["commit"](local_pb2.CommitWriteRequest(lease_id=r.lease_id, bindings=[
                local_pb2.Binding(slot=0, key=bob.keys(tokens(4, 1))[0], crc32c=0)]), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        bob._rpc["release"](local_pb2.ReleaseRequest(lease_ids=[r.lease_id]), timeout=10)
        # bob cannot read alice's namespace through the socket either
        with pytest.raises(ControlRpcError) as e:
            bob._rpc["lease_read"](local_pb2.LeaseReadRequest(namespace_id=alice.namespace_id,
                                                              keys=alice.keys(tokens(4, 1))), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert alice._rpc["release"](local_pb2.ReleaseRequest(lease_ids=[r.lease_id]), timeout=10).released == 1


def test_connections_per_tenant_are_bounded_and_a_refused_client_uses_grpc(auth_daemon):
    a_md = (("authorization", f"Bearer {ALICE}"),)
    a = attach(auth_daemon.addr, a_md)
    held = [hello(a.control_socket, a.control_ticket) for _ in range(2)]   # quotas.max_control_connections=2
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(a.control_socket)
    s.sendall(frame(0, 0, a.control_ticket))
    _, code, body = _read_frame(s)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and b"max_control_connections" in body
    with KVStoreClient(auth_daemon.addr, Namespace(**NS), token=ALICE) as c:
        assert c._core.control is None                       # refused: every call over gRPC
        x, toks = kv(5), tokens(5)
        assert c.store(toks, x) == 3 and np.array_equal(c.retrieve(toks)[1], x)
    with KVStoreClient(auth_daemon.addr, Namespace(**NS), token=BOB) as c:   # bob's own quota
        assert c._core.control is not None
    for h in held:
        h.close()
    # a client process killed while connected gives its connection back
    script = textwrap.dedent(f"""
        import sys, time
        from kvstore_client import KVStoreClient, Namespace
        c = KVStoreClient({auth_daemon.addr!r}, Namespace(**{NS!r}), token={ALICE!r})
        assert c._core.control is not None
        print("up", flush=True)
        time.sleep(60)
    """)
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "up"
        p.kill()
        p.wait()
    deadline = time.monotonic() + 10
    while True:
        with KVStoreClient(auth_daemon.addr, Namespace(**NS), token=ALICE) as c:
            if c._core.control is not None:
                break
        assert time.monotonic() < deadline, "killed clients' connections were not given back"
        time.sleep(0.2)


def test_off_and_restart_fall_back_to_grpc(tmp_path):
    d = spawn_daemon(base_dir=tmp_path / "off", settings=[*SETTINGS, "server.local_control=false"])
    try:
        assert attach(d.addr).control_socket == ""
        with KVStoreClient(d.addr, Namespace(**NS), local=True) as c:
            assert c._core.control is None and c.store(tokens(6), kv(6)) == 3
    finally:
        d.stop()
    d = spawn_daemon(base_dir=tmp_path / "on", settings=SETTINGS)
    try:
        with KVStoreClient(d.addr, Namespace(**NS), local=True) as c:
            first = c._core.control
            assert first is not None
            d.restart()
            x, toks = kv(7), tokens(7)
            deadline = time.monotonic() + 20
            while True:       # the first calls after a restart may fail, as over gRPC; then it works
                try:
                    assert c.store(toks, x) == 3
                    break
                except Exception:  # noqa: BLE001
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            assert np.array_equal(c.retrieve(toks)[1], x)
            assert not first.alive and c._core.control is not None and c._core.control.alive
    finally:
        d.stop()
