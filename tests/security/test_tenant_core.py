"""Tenant boundary core (issue 8): no stale bytes, admission control, no blocked workers,
bounded pins and leases. A real daemon on loopback, two tenants that both hold the
``local_path`` right (the strongest case: they map the arena), one of them hostile.

Each test fails on the code before this change: a commit with no CRC published unwritten
pages, reserved pages held other tenants' deleted chunks, a header allocated its announced
length, a reservation blocked every worker thread, pins and leases were unbounded.
"""

from __future__ import annotations

import statistics
import threading
import time

import grpc
import numpy as np
import pytest

from kvstore_client import KVStoreClient, Namespace
from kvstore_testing.data import ADMIN_TOKEN, ALICE_TOKEN, BOB_TOKEN
from kvstore_testing.daemon import spawn_daemon
from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc, data_pb2, local_pb2, local_pb2_grpc
from kvstore_wire.crc import crc32c
from kvstore_wire.framing import encode_data

from .conftest import kv, md

#: Alice is the victim, Bob (MALLORY) the hostile tenant; both may use the same-host path.
VICTIM, MALLORY = ALICE_TOKEN, BOB_TOKEN
TOKENS = {
    ADMIN_TOKEN: {"tenant": "ops", "admin": True},
    ALICE_TOKEN: {"tenant": "alice", "local_path": True},
    BOB_TOKEN: {"tenant": "bob", "local_path": True},
}
#: 64 KiB chunks: 4 layers x 2 heads x 64 tokens x (K, V) x 32 dims x fp16.
NS = dict(model="tenant-core", dtype="float16", num_layers=4, num_kv_heads=2, head_dim=32, chunk_tokens=64)
CHUNK_BYTES = 4 * 2 * 64 * 2 * 32 * 2
PIN_TTL_MAX_S = 5
PINNED_CHUNKS_MAX = 4
LEASES_MAX = 4
RESERVATIONS_MAX = 8
IDLE_S = 2.0
SETTINGS = [
    "dram.capacity_bytes=96MiB", "disk.capacity_bytes=512MiB", 'metrics.listen=""', "server.worker_threads=4",
    "server.shutdown_grace_s=1", "server.lease_ttl_s=20", f"quotas.max_stream_idle_s={IDLE_S}",
    "server.inflight_wait_s=1", f"quotas.max_pin_ttl_s={PIN_TTL_MAX_S}",
    f"quotas.max_pinned_bytes={PINNED_CHUNKS_MAX * CHUNK_BYTES}",
    f"quotas.max_open_leases={LEASES_MAX}",
    f"quotas.max_open_reservations={RESERVATIONS_MAX}",
]
MIB = 1024**2


def _tokens_file(path):
    """``auth.tokens_file`` with the ``local_path`` right (the shared writer has no field for it)."""
    lines = ["[tokens]"] + [f'"{t}" = {{ tenant = "{e["tenant"]}", admin = {str(e.get("admin", False)).lower()}, '
                            f'local_path = {str(e.get("local_path", False)).lower()} }}' for t, e in TOKENS.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("tenant-core")
    d = spawn_daemon(base_dir=base, settings=[*SETTINGS, f'auth.tokens_file="{_tokens_file(base / "tokens.toml")}"'])
    yield d
    d.stop()


def client(daemon, token: str, model: str, local: bool | None = None) -> KVStoreClient:
    return KVStoreClient(daemon.addr, Namespace(**{**NS, "model": model}), token=token, local=local)


def reserve(stub, c: KVStoreClient, keys, token: str = MALLORY):
    return stub.ReserveWrite(local_pb2.ReserveWriteRequest(namespace_id=c.namespace_id, chunks=[
        local_pb2.ChunkToWrite(key=k, num_tokens=64, encoding=1, payload_bytes=CHUNK_BYTES) for k in keys]),
        metadata=md(token), timeout=10)


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---------------------------------------------------------------------------------- stale bytes
def test_commit_without_or_with_a_wrong_crc_publishes_nothing(daemon):
    with client(daemon, MALLORY, "stale-1", local=True) as m, grpc.insecure_channel(daemon.addr) as ch:
        stub = local_pb2_grpc.LocalDataStub(ch)
        toks = list(range(64 * 2))
        keys = m.keys(toks)
        r = reserve(stub, m, keys[:1])
        with pytest.raises(grpc.RpcError) as e:       # reserved, nothing written, no CRC
            stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id), metadata=md(MALLORY), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "crc32c" in e.value.details()
        r = reserve(stub, m, keys[1:2])
        m.arena.view(r.slots[0].offset, r.slots[0].length)[:] = 7
        with pytest.raises(grpc.RpcError) as e:       # written, but not what the CRC says
            stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id, crc32c=[12345]),
                             metadata=md(MALLORY), timeout=10)
        assert e.value.code() == grpc.StatusCode.DATA_LOSS
        assert m.lookup(toks).matched_chunks == 0
        # The client's own path sends the CRC and is unaffected.
        assert m.store(toks, kv(128, 1)) == 2 and m.retrieve(toks)[0] == 128


def test_deleted_chunks_of_a_victim_are_never_readable_by_another_tenant(daemon):
    n = 64
    toks = list(range(64 * n))
    victim_kv = kv(len(toks), 2)
    with client(daemon, VICTIM, "victim", local=False) as v, client(daemon, MALLORY, "stale-2", local=True) as m, \
            grpc.insecure_channel(daemon.addr) as ch:
        stub = local_pb2_grpc.LocalDataStub(ch)
        assert v.store(toks, victim_kv) == n
        victim_chunks = {bytes(np.ascontiguousarray(victim_kv[:, :, i * 64:(i + 1) * 64]).view(np.uint8).reshape(-1))
                         for i in range(n)}
        victim_crcs = {crc32c(c) for c in victim_chunks}
        assert v.delete(v.keys(toks)) == n       # freed pages: the next reservations reuse them
        keys = m.keys(list(range(64 * RESERVATIONS_MAX)))
        seen = []
        for round_ in range(n // RESERVATIONS_MAX):
            r = reserve(stub, m, keys)
            exts = [bytes(m.arena.view(s.offset, s.length)) for s in r.slots]
            seen += exts
            # Hostile commit claiming the victim's bytes: refused, the extent is not theirs.
            with pytest.raises(grpc.RpcError) as e:
                stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id, crc32c=[next(iter(victim_crcs))]
                                                              * len(r.slots)), metadata=md(MALLORY), timeout=10)
            assert e.value.code() == grpc.StatusCode.DATA_LOSS
        assert all(x == bytes(CHUNK_BYTES) for x in seen), "a reserved extent was not cleared"
        assert not victim_chunks & set(seen)
        # A commit of the cleared extent (the CRC of zeros) publishes zeros, never the victim's bytes.
        r = reserve(stub, m, keys[:1])
        stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id, crc32c=[crc32c(bytes(CHUNK_BYTES))]),
                         metadata=md(MALLORY), timeout=10)
        got = stub.LeaseRead(local_pb2.LeaseReadRequest(namespace_id=m.namespace_id, keys=keys[:1]),
                             metadata=md(MALLORY), timeout=10)
        ext = got.extents[0]
        assert ext.found and bytes(m.arena.view(ext.offset, ext.length)) == bytes(CHUNK_BYTES)
        stub.Release(local_pb2.ReleaseRequest(lease_ids=[got.lease_id]), metadata=md(MALLORY), timeout=10)


# ---------------------------------------------------------------------------------- no blocked workers
def test_a_held_reservation_and_puts_of_its_key_do_not_block_other_tenants(daemon):
    with client(daemon, VICTIM, "fast-get", local=False) as v, client(daemon, MALLORY, "hammer", local=True) as m, \
            grpc.insecure_channel(daemon.addr) as ch:
        stub = local_pb2_grpc.LocalDataStub(ch)
        vt = list(range(64))
        v.store(vt, kv(64, 3))
        key = m.keys(list(range(64)))[0]
        r = reserve(stub, m, [key])           # held, never committed (lease_ttl_s=20)
        assert r.lease_id
        payload = np.zeros(CHUNK_BYTES, np.uint8)
        put = m._channel.stream_unary("/kvstore.v1.KVStore/Put")
        msgs = lambda: iter([data_pb2.PutRequest(header=data_pb2.PutChunkHeader(  # noqa: E731
            namespace_id=m.namespace_id, key=key, num_tokens=64, encoding=1, payload_bytes=CHUNK_BYTES,
            crc32c=crc32c(payload))).SerializeToString(), encode_data(payload)])
        outcomes, stop = [], threading.Event()

        def hammer():
            while not stop.is_set():
                t0 = time.perf_counter()
                resp = data_pb2.PutResponse.FromString(put(msgs(), metadata=md(MALLORY), timeout=30))
                outcomes.append((time.perf_counter() - t0, resp.existed))

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            lat = []
            for _ in range(10):
                t0 = time.perf_counter()
                assert v.retrieve(vt)[0] == 64
                lat.append(time.perf_counter() - t0)
        finally:
            stop.set()
            for t in threads:
                t.join()
        stub.Release(local_pb2.ReleaseRequest(lease_ids=[r.lease_id]), metadata=md(MALLORY), timeout=10)
        assert statistics.median(lat) < 0.1 and max(lat) < 1.0, lat
        # The hostile puts returned at once as "existed" (pending), they did not wait for the lease.
        assert outcomes and all(e == 1 for _, e in outcomes) and max(d for d, _ in outcomes) < 5


# ---------------------------------------------------------------------------------- admission control
class _Stalled:
    """A Put stream that sends ``messages`` and then nothing (until ``release``)."""

    def __init__(self, ch, token: str, messages) -> None:
        self.gate = threading.Event()

        def gen():
            yield from messages
            self.gate.wait()

        self.future = ch.stream_unary("/kvstore.v1.KVStore/Put").future(gen(), metadata=md(token), timeout=60)

    def code(self, timeout_s: float = 30):
        try:
            self.future.result(timeout=timeout_s)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details()
        finally:
            self.gate.set()


def _header(c: KVStoreClient, key: bytes, payload_bytes: int, encoding: int = 2) -> bytes:
    return data_pb2.PutRequest(header=data_pb2.PutChunkHeader(
        namespace_id=c.namespace_id, key=key, num_tokens=1, encoding=encoding,
        payload_bytes=payload_bytes)).SerializeToString()


def test_header_only_and_stalled_streams_cost_no_memory_and_are_cancelled(daemon):
    pid = daemon.proc.pid
    with client(daemon, MALLORY, "hostile-streams", local=False) as m, \
            client(daemon, VICTIM, "busy", local=False) as v, grpc.insecure_channel(daemon.addr) as ch:
        v.store(list(range(64)), kv(64, 4))       # warm the daemon's allocator and gRPC buffers
        base = rss_bytes(pid)
        keys = m.keys(list(range(64 * 8)))
        piece = bytes(MIB)
        streams = [_Stalled(ch, MALLORY, [_header(m, keys[i], 256 * MIB)]) for i in range(6)]
        streams += [_Stalled(ch, MALLORY, [_header(m, keys[i], 256 * MIB)] + [encode_data(piece)] * 8)
                    for i in (6, 7)]
        time.sleep(IDLE_S / 2)
        held = rss_bytes(pid) - base
        # Meanwhile another tenant's puts and gets work.
        toks = list(range(1000, 1000 + 64 * 4))
        assert v.store(toks, kv(len(toks), 5)) == 4 and v.retrieve(toks)[0] == len(toks)
        codes = [s.code() for s in streams]
        assert all(c == grpc.StatusCode.DEADLINE_EXCEEDED and "quotas.max_stream_idle_s" in d for c, d in codes), codes
        after = rss_bytes(pid) - base
    # Six headers announcing 256 MiB each (1.5 GiB) plus 16 MiB of stalled data: bounded by
    # what actually arrived, and given back once the streams are cancelled.
    assert held < 64 * MIB, held
    assert after < 48 * MIB, after


def dram_used(ch) -> int:
    stats = admin_pb2_grpc.AdminStub(ch).GetStats(admin_pb2.GetStatsRequest(), metadata=md(ADMIN_TOKEN), timeout=10)
    return next(t.used_bytes for t in stats.tiers if t.tier == 2)


def test_a_get_whose_reader_stalls_is_cancelled_and_frees_its_lease(daemon):
    big = dict(NS, model="stalled-reader", num_layers=32, num_kv_heads=8, head_dim=128)   # 8 MiB chunks
    with KVStoreClient(daemon.addr, Namespace(**big), token=MALLORY, local=False) as m, \
            grpc.insecure_channel(daemon.addr) as ch:
        before = dram_used(ch)
        toks = list(range(64 * 4))
        data = np.random.default_rng(12).standard_normal((32, 2, len(toks), 8, 128)).astype(np.float16)
        assert m.store(toks, data) == 4
        get = ch.unary_stream("/kvstore.v1.KVStore/Get")
        it = get(data_pb2.GetRequest(namespace_id=m.namespace_id, keys=m.keys(toks)).SerializeToString(),
                 metadata=md(MALLORY), timeout=60)
        next(it)                                   # the first header, then the reader stops reading
        time.sleep(0.5)
        assert m.delete(m.keys(toks)) == 4         # gone from lookups; the streamed one stays leased
        assert dram_used(ch) > before
        deadline = time.time() + IDLE_S + 10
        while dram_used(ch) > before and time.time() < deadline:
            time.sleep(0.2)
        assert dram_used(ch) == before, "the stalled Get still holds its lease"
        it.cancel()   # (grpc does not end the HTTP/2 stream while a send is pending: see docs/security.md)


def test_inflight_budget_and_stream_cap(daemon_factory):
    d = daemon_factory(auth=False, settings=("server.max_chunk_bytes=32MiB", "quotas.daemon_max_inflight_request_bytes=48MiB",
                                             "server.inflight_wait_s=1", "server.max_concurrent_streams=3",
                                             f"quotas.max_stream_idle_s={IDLE_S * 2}"))
    with KVStoreClient(d.addr, Namespace(**{**NS, "model": "budget"}), local=False) as c, \
            grpc.insecure_channel(d.addr) as ch:
        keys = c.keys(list(range(64 * 4)))
        piece = bytes(MIB)
        holder = _Stalled(ch, "", [_header(c, keys[0], 32 * MIB)] + [encode_data(piece)] * 30)
        time.sleep(1.0)
        over = _Stalled(ch, "", [_header(c, keys[1], 32 * MIB)] + [encode_data(piece)] * 30)
        code, details = over.code()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "quotas.daemon_max_inflight_request_bytes" in details, details
        # The cap on open streams: two stalled (the holder and one header-only) + one more is the limit.
        s2 = _Stalled(ch, "", [_header(c, keys[2], 1024)])
        s3 = _Stalled(ch, "", [_header(c, keys[3], 1024)])
        time.sleep(0.5)
        code, details = _Stalled(ch, "", [_header(c, keys[3], 1024)]).code()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "server.max_concurrent_streams" in details, details
        for s in (holder, s2, s3):
            s.code()
        # Everything was given back: a full-budget chunk goes through now.
        assert c.store(list(range(64)), kv(64, 6)) == 1


# ---------------------------------------------------------------------------------- pins and leases
def test_pins_are_clamped_and_bounded_per_tenant(daemon):
    with client(daemon, MALLORY, "pins", local=False) as m, client(daemon, VICTIM, "pins-v", local=False) as v, \
            grpc.insecure_channel(daemon.addr) as ch:
        toks = list(range(64 * (PINNED_CHUNKS_MAX + 2)))
        m.store(toks, kv(len(toks), 7))
        head = toks[:64 * PINNED_CHUNKS_MAX]
        t0 = time.time()
        assert m.lookup(head, pin_ttl_s=2**32 - 1).matched_chunks == PINNED_CHUNKS_MAX
        admin = admin_pb2_grpc.AdminStub(ch)
        info = admin.Inspect(admin_pb2.InspectRequest(namespace_id=m.namespace_id, key=m.keys(head)[0]),
                             metadata=md(ADMIN_TOKEN), timeout=10).entry
        assert info.pinned and 0 < info.pin_expires_unix_s <= t0 + PIN_TTL_MAX_S + 1
        with pytest.raises(Exception, match="quotas.max_pinned_bytes"):
            m.lookup(toks, pin_ttl_s=30)          # two more chunks: over the tenant's pinned bytes
        assert m.lookup(head, pin_ttl_s=30).matched_chunks == PINNED_CHUNKS_MAX   # re-pinning is free
        vt = list(range(64 * 2))                  # the other tenant pins within its own limit
        v.store(vt, kv(len(vt), 8))
        assert v.lookup(vt, pin_ttl_s=30).matched_chunks == 2


def test_open_leases_and_reservations_are_bounded_per_tenant(daemon):
    with client(daemon, MALLORY, "leases", local=True) as m, client(daemon, VICTIM, "leases-v", local=True) as v, \
            grpc.insecure_channel(daemon.addr) as ch:
        stub = local_pb2_grpc.LocalDataStub(ch)
        toks = list(range(64))
        m.store(toks, kv(64, 9))
        v.store(toks, kv(64, 10))
        req = local_pb2.LeaseReadRequest(namespace_id=m.namespace_id, keys=m.keys(toks))
        held = [stub.LeaseRead(req, metadata=md(MALLORY), timeout=10).lease_id for _ in range(LEASES_MAX)]
        with pytest.raises(grpc.RpcError) as e:
            stub.LeaseRead(req, metadata=md(MALLORY), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "quotas.max_open_leases" in e.value.details()
        assert v.retrieve(toks)[0] == 64 and v.transport == "shm"   # the victim still leases
        keys = m.keys(list(range(1000, 1000 + 64 * (RESERVATIONS_MAX + 1))))
        r = reserve(stub, m, keys[:RESERVATIONS_MAX])
        with pytest.raises(grpc.RpcError) as e:
            reserve(stub, m, keys[RESERVATIONS_MAX:])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "quotas.max_open_reservations" in e.value.details()
        vt = list(range(2000, 2000 + 64 * 2))
        assert v.store(vt, kv(len(vt), 11)) == 2                        # the victim still reserves
        released = stub.Release(local_pb2.ReleaseRequest(lease_ids=held + [r.lease_id]), metadata=md(MALLORY),
                                timeout=10).released
        assert released == LEASES_MAX + 1
        assert stub.LeaseRead(req, metadata=md(MALLORY), timeout=10).lease_id   # given back: works again
