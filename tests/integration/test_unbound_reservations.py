"""Unbound reservations against a real daemon: same-host extents reserved ahead of need,
without keys, filled by the writer and bound to keys at CommitWrite (``bindings``), the slots
not yet used kept under the same lease (``keep_lease``). What a writer cannot do with them:
publish another chunk's key over stored bytes, bind a slot twice or one it does not hold,
commit the checksums the keyed way, use another tenant's lease, or hold pages past the TTL."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

import kvstore_native as native
from kvstore.server.local import LeaseTable
from kvstore_client import KVStoreClient, Namespace
from kvstore_testing.daemon import spawn_daemon
from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc, local_pb2, local_pb2_grpc
from kvstore_wire.types import Encoding

NS = dict(model="unbound-test", dtype="float16", num_layers=4, num_kv_heads=2, head_dim=32, chunk_tokens=64)
CHUNK = 4 * 2 * 64 * 2 * 32 * 2


def chunk_bytes(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, CHUNK, dtype=np.uint8)


def kv_of(chunks: list[np.ndarray]) -> np.ndarray:
    """The namespace-layout tensor whose chunks are ``chunks`` (raw chunk bytes, in order)."""
    return np.concatenate([c.view(np.float16).reshape(4, 2, 64, 2, 32) for c in chunks], axis=2)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact (random bytes hold NaNs)."""
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                                                 np.ascontiguousarray(b).view(np.uint8))


def dram_used(addr: str) -> int:
    with grpc.insecure_channel(addr) as ch:
        stats = admin_pb2_grpc.AdminStub(ch).GetStats(admin_pb2.GetStatsRequest(), timeout=5)
    return next(t.used_bytes for t in stats.tiers if t.tier == 2)


def reserve_unbound(stub, c, n: int, md=()):
    return stub.ReserveWrite(local_pb2.ReserveWriteRequest(namespace_id=c.namespace_id, chunks=[
        local_pb2.ChunkToWrite(num_tokens=64, encoding=Encoding.RAW, payload_bytes=CHUNK) for _ in range(n)]),
        metadata=md)


def fill(c, slot, data: np.ndarray) -> int:
    ext = c.arena.view(slot.offset, slot.length)
    ext[:] = data
    return native.crc32c(ext)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_attach_announces_unbound_reservations(daemon):
    with KVStoreClient(daemon.addr, Namespace(**NS)) as c:
        with grpc.insecure_channel(daemon.addr) as ch:
            assert local_pb2_grpc.LocalDataStub(ch).Attach(local_pb2.AttachRequest()).unbound_reservations
        assert c.transport == "shm"


def test_bound_in_two_commits_keeping_the_rest_reads_back_bit_exact(daemon):
    ns = Namespace(**{**NS, "model": "unbound-two-commits"})
    toks = list(range(64 * 4))
    data = [chunk_bytes(i) for i in range(4)]
    with KVStoreClient(daemon.addr, ns) as c, grpc.insecure_channel(daemon.addr) as ch:
        stub = local_pb2_grpc.LocalDataStub(ch)
        keys = c.keys(toks)
        r = reserve_unbound(stub, c, 4)
        assert r.lease_id and [s.index for s in r.slots] == [0, 1, 2, 3] and not any(s.exists for s in r.slots)
        assert c.lookup(toks).matched_chunks == 0
        # Chunks 0 and 1 into slots 2 and 0 (any slot takes any key), the rest kept.
        b = [local_pb2.Binding(slot=2, key=keys[0], crc32c=fill(c, r.slots[2], data[0])),
             local_pb2.Binding(slot=0, key=keys[1], crc32c=fill(c, r.slots[0], data[1]))]
        got = stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id, bindings=b, keep_lease=True))
        assert (got.stored, got.existed) == (2, 0)
        assert c.lookup(toks).matched_chunks == 2
        b = [local_pb2.Binding(slot=1, key=keys[2], crc32c=fill(c, r.slots[1], data[2])),
             local_pb2.Binding(slot=3, key=keys[3], crc32c=fill(c, r.slots[3], data[3]))]
        got = stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id, bindings=b))
        assert (got.stored, got.existed) == (2, 0)
        matched, kv = c.retrieve(toks)
        assert matched == 256
        assert same(kv, kv_of(data))
        # Without keep_lease the lease ended: nothing is left to commit.
        code, _ = code_of(lambda: stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id)))
        assert code == grpc.StatusCode.NOT_FOUND


def test_kept_commits_of_one_lease_run_concurrently_and_the_last_slot_ends_it(daemon):
    ns = Namespace(**{**NS, "model": "unbound-concurrent"})
    n = 8
    toks = list(range(64 * n))
    data = [chunk_bytes(20 + i) for i in range(n)]
    with KVStoreClient(daemon.addr, ns) as c, grpc.insecure_channel(daemon.addr) as ch:
        stub = local_pb2_grpc.LocalDataStub(ch)
        keys = c.keys(toks)
        r = reserve_unbound(stub, c, n)
        crcs = [fill(c, r.slots[i], data[i]) for i in range(n)]
        futs = [stub.CommitWrite.future(local_pb2.CommitWriteRequest(
            lease_id=r.lease_id, keep_lease=True,
            bindings=[local_pb2.Binding(slot=i, key=keys[i], crc32c=crcs[i])])) for i in range(n)]
        assert sum(f.result(timeout=30).stored for f in futs) == n
        assert same(c.retrieve(toks)[1], kv_of(data))
        code, _ = code_of(lambda: stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id,
                                                                                keep_lease=True)))
        assert code == grpc.StatusCode.NOT_FOUND     # every slot bound: the lease ended by itself


def test_a_key_already_stored_keeps_its_bytes_and_the_extent_is_given_back(daemon):
    ns = Namespace(**{**NS, "model": "unbound-existing"})
    toks = list(range(64 * 2))
    first = [chunk_bytes(10), chunk_bytes(11)]
    with KVStoreClient(daemon.addr, ns) as c, grpc.insecure_channel(daemon.addr) as ch:
        stub = local_pb2_grpc.LocalDataStub(ch)
        keys = c.keys(toks)
        c.store(toks[:64], kv_of(first[:1]))
        used = dram_used(daemon.addr)
        r = reserve_unbound(stub, c, 3)
        # The same key twice in one commit: the first binding stores it, the second exists.
        b = [local_pb2.Binding(slot=0, key=keys[0], crc32c=fill(c, r.slots[0], chunk_bytes(99))),
             local_pb2.Binding(slot=1, key=keys[1], crc32c=fill(c, r.slots[1], first[1])),
             local_pb2.Binding(slot=2, key=keys[1], crc32c=fill(c, r.slots[2], chunk_bytes(98)))]
        got = stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id, bindings=b))
        assert (got.stored, got.existed, list(got.existed_slots)) == (1, 2, [0, 2])
        assert same(c.retrieve(toks)[1], kv_of(first))    # chunk 0 kept its bytes
        assert dram_used(daemon.addr) == used + CHUNK                  # only one more chunk's pages held


def test_malformed_commits_are_invalid_and_end_the_lease(daemon):
    ns = Namespace(**{**NS, "model": "unbound-malformed"})
    with KVStoreClient(daemon.addr, ns) as c, grpc.insecure_channel(daemon.addr) as ch:
        stub = local_pb2_grpc.LocalDataStub(ch)
        key = c.keys(list(range(64)))[0]
        before = dram_used(daemon.addr)
        cases = {
            "unknown slot": dict(bindings=[local_pb2.Binding(slot=7, key=key)]),
            "a slot twice": dict(bindings=[local_pb2.Binding(slot=0, key=key), local_pb2.Binding(slot=0, key=key)]),
            "short key": dict(bindings=[local_pb2.Binding(slot=0, key=b"abc")]),
            "keyed checksums": dict(crc32c=[1]),
        }
        for what, fields in cases.items():
            r = reserve_unbound(stub, c, 2)
            code, msg = code_of(lambda: stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id, **fields)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, msg)
            code, _ = code_of(lambda: stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id)))
            assert code == grpc.StatusCode.NOT_FOUND, what
        assert dram_used(daemon.addr) == before
        assert c.lookup(list(range(64))).matched_chunks == 0
        # keyed and unbound chunks in one request; bindings on a keyed reservation
        code, msg = code_of(lambda: stub.ReserveWrite(local_pb2.ReserveWriteRequest(namespace_id=c.namespace_id, chunks=[
            local_pb2.ChunkToWrite(key=key, num_tokens=64, encoding=Encoding.RAW, payload_bytes=CHUNK),
            local_pb2.ChunkToWrite(num_tokens=64, encoding=Encoding.RAW, payload_bytes=CHUNK)])))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "unbound" in msg
        r = stub.ReserveWrite(local_pb2.ReserveWriteRequest(namespace_id=c.namespace_id, chunks=[
            local_pb2.ChunkToWrite(key=key, num_tokens=64, encoding=Encoding.RAW, payload_bytes=CHUNK)]))
        code, msg = code_of(lambda: stub.CommitWrite(local_pb2.CommitWriteRequest(
            lease_id=r.lease_id, keep_lease=True, crc32c=[0])))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "keyed" in msg
        # A header the namespace refuses is refused unbound too.
        code, msg = code_of(lambda: stub.ReserveWrite(local_pb2.ReserveWriteRequest(namespace_id=c.namespace_id, chunks=[
            local_pb2.ChunkToWrite(num_tokens=64, encoding=Encoding.RAW, payload_bytes=CHUNK + 1)])))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "payload_bytes" in msg
        assert dram_used(daemon.addr) == before


def test_a_wrong_checksum_stores_nothing_and_the_good_binding_lands(daemon):
    ns = Namespace(**{**NS, "model": "unbound-crc"})
    toks = list(range(128))
    good = chunk_bytes(5)
    with KVStoreClient(daemon.addr, ns) as c, grpc.insecure_channel(daemon.addr) as ch:
        stub = local_pb2_grpc.LocalDataStub(ch)
        keys = c.keys(toks)
        r = reserve_unbound(stub, c, 2)
        b = [local_pb2.Binding(slot=0, key=keys[0], crc32c=fill(c, r.slots[0], good)),
             local_pb2.Binding(slot=1, key=keys[1], crc32c=fill(c, r.slots[1], chunk_bytes(6)) ^ 1)]
        code, msg = code_of(lambda: stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id, bindings=b)))
        assert code == grpc.StatusCode.DATA_LOSS and "not stored" in msg
        assert c.lookup(toks).matched_chunks == 1
        assert same(c.retrieve(toks[:64])[1], kv_of([good]))


def test_unbound_reservations_expire_and_count_against_the_tenant(daemon_factory):
    d = daemon_factory(settings=("server.lease_ttl_s=1", "quotas.max_open_reservations=4"))
    with KVStoreClient(d.addr, Namespace(**NS)) as c, grpc.insecure_channel(d.addr) as ch:
        stub = local_pb2_grpc.LocalDataStub(ch)
        before = dram_used(d.addr)
        r = reserve_unbound(stub, c, 4)
        assert dram_used(d.addr) == before + 4 * CHUNK
        code, msg = code_of(lambda: reserve_unbound(stub, c, 1))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_open_reservations" in msg
        deadline = time.monotonic() + 10
        while dram_used(d.addr) > before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dram_used(d.addr) == before          # the sweeper gave the pages back
        code, _ = code_of(lambda: stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id)))
        assert code == grpc.StatusCode.NOT_FOUND
        assert reserve_unbound(stub, c, 4).lease_id  # and the tenant's count


def test_another_tenant_cannot_bind_into_my_lease(tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text("[tokens]\n"
                      '"tok-alice-local-0123456789abcdef" = { tenant = "alice", local_path = true }\n'
                      '"tok-bob-local-0123456789abcdefgh" = { tenant = "bob", local_path = true }\n')
    d = spawn_daemon(base_dir=tmp_path, settings=["dram.capacity_bytes=64MiB", "disk.enabled=false",
                                                  'metrics.listen=""', f'auth.tokens_file="{tokens}"'])
    try:
        a_md = (("authorization", "Bearer tok-alice-local-0123456789abcdef"),)
        b_md = (("authorization", "Bearer tok-bob-local-0123456789abcdefgh"),)
        with KVStoreClient(d.addr, Namespace(**NS), token="tok-alice-local-0123456789abcdef") as a, \
                KVStoreClient(d.addr, Namespace(**NS), token="tok-bob-local-0123456789abcdefgh") as b, \
                grpc.insecure_channel(d.addr) as ch:
            stub = local_pb2_grpc.LocalDataStub(ch)
            r = reserve_unbound(stub, a, 1, a_md)
            bkey = b.keys(list(range(64)))[0]
            crc = fill(b, r.slots[0], chunk_bytes(1))
            code, _ = code_of(lambda: stub.CommitWrite(local_pb2.CommitWriteRequest(
                lease_id=r.lease_id, bindings=[local_pb2.Binding(slot=0, key=bkey, crc32c=crc)]), metadata=b_md))
            assert code == grpc.StatusCode.NOT_FOUND
            assert b.lookup(list(range(64))).matched_chunks == 0
            # The lease is still alice's; her binding lands in her namespace only.
            akey = a.keys(list(range(64)))[0]
            got = stub.CommitWrite(local_pb2.CommitWriteRequest(
                lease_id=r.lease_id, bindings=[local_pb2.Binding(slot=0, key=akey, crc32c=crc)]), metadata=a_md)
            assert got.stored == 1
            assert a.lookup(list(range(64))).matched_chunks == 1
            assert b.lookup(list(range(64))).matched_chunks == 0
    finally:
        d.stop()


class _NoLocal:
    def abort(self, res):  # noqa: D401 - what LeaseTable releases through
        pass


def test_a_kept_lease_is_renewed():
    now = [100.0]
    table = LeaseTable(_NoLocal(), ttl_s=5, max_open=8, clock=lambda: now[0])
    lease = table.new()
    lid = table.open(lease)
    now[0] = 104.0
    table.renew(table.peek(lid))             # a CommitWrite with keep_lease
    now[0] = 106.0
    assert table.sweep() == 0                # would have expired at 105
    assert table.peek(lid) is lease
    now[0] = 109.5
    assert table.sweep() == 1


def test_the_gpu_clients_write_pool_refills_hands_out_and_gives_back(daemon_factory):
    """``gpu_pool.WritePool`` (what GPU stores take their extents from) on a real daemon,
    without a GPU: refills to its target in leases of the configured size, hands out slots
    oldest lease first (a lease stays ready while it has slots), backs off when refused, and
    gives everything back at close, once the commits in flight are answered."""
    from kvstore_client.gpu_pool import WritePool
    from kvstore_client.gpu_session import GpuSession

    d = daemon_factory(settings=("quotas.max_open_reservations=12",))
    with KVStoreClient(d.addr, Namespace(**{**NS, "model": "unbound-pool"})) as c:
        s = GpuSession.of(c)
        assert s.unbound_reservations and s.lease_ttl_s == 30
        before = dram_used(d.addr)
        pool = WritePool(s, CHUNK, 16 * CHUNK)
        pool.note_call(4)
        assert pool.lease_chunks == 16      # at least MIN_LEASE_BYTES a lease, at most the target
        pool.lease_chunks = 4               # (chunks this small: four per lease, for the test)
        pool.refill()
        deadline = time.monotonic() + 10
        while pool.refused == 0 and time.monotonic() < deadline:   # 12 granted, then refused
            pool.refill()
            time.sleep(0.05)
        assert pool.ready_slots() == 12 and pool.refused >= 1
        assert dram_used(d.addr) == before + 12 * CHUNK
        got = pool.take(6)
        assert [len(slots) for _, slots in got] == [4, 2] and pool.ready_slots() == 6
        le, slots = got[1]
        keys = c.keys(list(range(64 * 2)))
        data = [chunk_bytes(40), chunk_bytes(41)]
        with grpc.insecure_channel(d.addr) as ch:
            stub = local_pb2_grpc.LocalDataStub(ch)
            b = [local_pb2.Binding(slot=sl.index, key=k, crc32c=fill(c, sl, x)) for sl, k, x in zip(slots, keys, data)]
            pool.begin(le)
            got_c = stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=le.lease_id, bindings=b, keep_lease=True))
            pool.end(le, time.time() + 30)
        assert got_c.stored == 2
        assert same(c.retrieve(list(range(128)))[1], kv_of(data))
        assert pool.take(3)[0][0] is le     # its other two slots first (oldest lease), then the next
        pool.retire(got[0][0])              # what a failed store does with a lease it held
        pool.close()
        s.drain(5)
        deadline = time.monotonic() + 5
        while dram_used(d.addr) > before + 4 * CHUNK and time.monotonic() < deadline:
            time.sleep(0.05)
        # The two stored chunks and the lease whose last two slots are handed out (a store
        # binds or retires them) hold pages; the leases given back (the third one with its
        # slot handed out) hold none.
        assert dram_used(d.addr) == before + 4 * CHUNK
