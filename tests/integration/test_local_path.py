"""The same-host shared-memory path against a real daemon: bytes move through the mapped
arena, gRPC carries descriptors; leases expire; a client that dies leaks nothing."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from kvstore_client import KVStoreClient, Namespace, Tier
from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc, local_pb2, local_pb2_grpc

NS = dict(model="local-path-test", dtype="float16", num_layers=4, num_kv_heads=2, head_dim=32, chunk_tokens=64)


def kv_for(tokens: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, 2, tokens, 2, 32)).astype(np.float16)


def dram_used(addr: str) -> int:
    with grpc.insecure_channel(addr) as ch:
        stats = admin_pb2_grpc.AdminStub(ch).GetStats(admin_pb2.GetStatsRequest(), timeout=5)
    return next(t.used_bytes for t in stats.tiers if t.tier == 2)


def test_shm_round_trip_is_bit_exact_and_interoperates_with_the_stream_path(daemon):
    toks = list(range(64 * 5 + 10))
    kv = kv_for(len(toks), 1)
    with KVStoreClient(daemon.addr, Namespace(**NS)) as shm, KVStoreClient(daemon.addr, Namespace(**NS), local=False) as stream:
        assert shm.transport == "shm" and stream.transport == "grpc"
        assert shm.store(toks, kv) == 5
        # Stored through shared memory, read through the stream, and the other way round.
        n, out = stream.retrieve(toks)
        assert n == 320 and np.array_equal(out, kv[:, :, :320])
        toks2 = [t + 1000 for t in toks]
        kv2 = kv_for(len(toks2), 2)
        assert stream.store(toks2, kv2) == 5
        n2, out2 = shm.retrieve(toks2)
        assert n2 == 320 and np.array_equal(out2, kv2[:, :, :320])
        # Partial prefix: the retrieve stops at the first missing chunk.
        assert shm.delete([shm.keys(toks)[3]]) == 1
        n3, out3 = shm.retrieve(toks)
        assert n3 == 192 and np.array_equal(out3, kv[:, :, :192])


def test_disk_hits_are_promoted_and_leased(daemon_factory):
    d = daemon_factory(settings=("server.lease_ttl_s=5",))
    toks = list(range(128))
    kv = kv_for(128, 3)
    with KVStoreClient(d.addr, Namespace(**NS)) as c:
        from kvstore_wire.types import Durability
        c.store(toks, kv, durability=Durability.PERSISTED)
    d.restart()  # DRAM is empty now; the chunks are on disk
    with KVStoreClient(d.addr, Namespace(**NS)) as c:
        assert c.transport == "shm"
        n, out = c.retrieve(toks)
        assert n == 128 and np.array_equal(out, kv)


def test_private_arena_falls_back_to_stream(daemon_factory):
    d = daemon_factory(settings=('dram.shm_name=""',))
    with KVStoreClient(d.addr, Namespace(**NS)) as c:
        assert c.transport == "grpc"
        toks = list(range(64))
        c.store(toks, kv_for(64, 4))
        assert c.retrieve(toks)[0] == 64
    with pytest.raises(Exception, match="no shared arena"):
        KVStoreClient(d.addr, Namespace(**NS), local=True)


def test_abandoned_reservation_is_reclaimed_after_the_lease_ttl(daemon_factory):
    d = daemon_factory(settings=("server.lease_ttl_s=1",))
    before = dram_used(d.addr)
    # A separate process reserves extents and dies without committing or releasing.
    code = f"""
import os
from kvstore_client import KVStoreClient, Namespace, Tier
from kvstore_wire._proto.kvstore.v1 import local_pb2
from kvstore_wire.types import Encoding
c = KVStoreClient({d.addr!r}, Namespace(**{NS!r}))
ns = c.namespace
req = local_pb2.ReserveWriteRequest(namespace_id=c.namespace_id, chunks=[
    local_pb2.ChunkToWrite(key=k, num_tokens=64, encoding=Encoding.RAW, payload_bytes=ns.chunk_bytes())
    for k in c.keys(list(range(64 * 4)))])
r = c._reserve(req)
assert r.lease_id and all(not s.exists for s in r.slots)
c.arena.view(r.slots[0].offset, r.slots[0].length)[:] = 7   # half-written
os._exit(9)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    assert dram_used(d.addr) > before          # the reservation holds pages ...
    deadline = time.monotonic() + 10
    while dram_used(d.addr) > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert dram_used(d.addr) == before         # ... until the sweeper reclaims them
    with KVStoreClient(d.addr, Namespace(**NS)) as c:
        assert c.lookup(list(range(64 * 4))).matched_chunks == 0  # nothing half-written is visible


def test_read_lease_protects_chunks_until_released(daemon_factory):
    d = daemon_factory(settings=("server.lease_ttl_s=30",))
    toks = list(range(64 * 2))
    kv = kv_for(128, 5)
    with KVStoreClient(d.addr, Namespace(**NS)) as c:
        c.store(toks, kv)
        keys = c.keys(toks)
        with grpc.insecure_channel(d.addr) as ch:
            stub = local_pb2_grpc.LocalDataStub(ch)
            lease = stub.LeaseRead(local_pb2.LeaseReadRequest(namespace_id=c.namespace_id, keys=keys))
            assert lease.lease_id and all(e.found for e in lease.extents)
            used = dram_used(d.addr)
            assert c.delete(keys) == 2                 # deleted: no longer visible ...
            assert c.lookup(toks).matched_chunks == 0
            ext = lease.extents[0]
            chunk = c.arena.view(ext.offset, ext.length)
            expect = np.ascontiguousarray(kv[:, :, :64]).view(np.uint8).reshape(-1)
            assert np.array_equal(chunk, expect)       # ... but the leased bytes are intact
            assert dram_used(d.addr) == used           # and their pages are not reused yet
            assert stub.Release(local_pb2.ReleaseRequest(lease_ids=[lease.lease_id])).released == 1
            assert dram_used(d.addr) < used
            with pytest.raises(grpc.RpcError) as e:
                stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=lease.lease_id))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_commit_rejects_a_wrong_checksum_and_stores_nothing(daemon):
    with KVStoreClient(daemon.addr, Namespace(**{**NS, "model": "crc-check"})) as c:
        ns = c.namespace
        keys = c.keys(list(range(64)))
        with grpc.insecure_channel(daemon.addr) as ch:
            stub = local_pb2_grpc.LocalDataStub(ch)
            r = stub.ReserveWrite(local_pb2.ReserveWriteRequest(namespace_id=c.namespace_id, chunks=[
                local_pb2.ChunkToWrite(key=keys[0], num_tokens=64, encoding=1, payload_bytes=ns.chunk_bytes())]))
            c.arena.view(r.slots[0].offset, r.slots[0].length)[:] = 1
            with pytest.raises(grpc.RpcError) as e:
                stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id, crc32c=[12345]))
            assert e.value.code() == grpc.StatusCode.DATA_LOSS and "not stored" in e.value.details()
            assert c.lookup(list(range(64))).matched_chunks == 0


def test_lookup_reads_the_presence_index_and_follows_evictions(daemon):
    toks = list(range(64 * 4))
    with KVStoreClient(daemon.addr, Namespace(**{**NS, "model": "presence"})) as c, \
            KVStoreClient(daemon.addr, Namespace(**{**NS, "model": "presence"}), local=False) as rpc:
        assert c.presence is not None and rpc.presence is None
        assert c.lookup(toks).matched_chunks == 0
        c.store(toks, kv_for(len(toks), 9))
        for client in (c, rpc):
            hit = client.lookup(toks)
            assert hit.matched_chunks == 4 and set(hit.tiers) <= {Tier.DRAM, Tier.DISK}
        c.delete([c.keys(toks)[2]])
        assert c.lookup(toks).matched_chunks == rpc.lookup(toks).matched_chunks == 2


def test_tokens_without_local_path_use_the_stream(auth_daemon):
    from integration.helpers import TOKENS
    alice = next(t for t, e in TOKENS.items() if e["tenant"] == "alice")
    with KVStoreClient(auth_daemon.addr, Namespace(**NS), token=alice) as c:
        assert c.transport == "grpc" and c.presence is None
        toks = list(range(64))
        c.store(toks, kv_for(64, 10))
        assert c.lookup(toks).matched_chunks == 1


def test_client_outlives_a_daemon_restart(daemon_factory):
    """Offsets from the new daemon are never read in the old daemon's mapping: the client
    notices the new arena (nonce, removed index file) and maps it again."""
    from kvstore_client import Durability
    d = daemon_factory()
    toks = list(range(64 * 3))
    kv = kv_for(len(toks), 21)
    with KVStoreClient(d.addr, Namespace(**NS)) as c:
        c.store(toks, kv, durability=Durability.PERSISTED)
        old_arena = c.arena.path
        d.restart()                                   # new pid, new arena, new index
        hit = c.lookup(toks)                          # stale index noticed -> re-attached
        assert hit.matched_chunks == 3 and set(hit.tiers) == {Tier.DISK}
        assert c.arena is not None and c.arena.path != old_arena
        n, out = c.retrieve(toks)
        assert n == 192 and np.array_equal(out, kv[:, :, :192])
        d.restart()                                   # again, this time caught by the nonce
        toks2 = [t + 7000 for t in toks]
        kv2 = kv_for(len(toks2), 22)
        assert c.store(toks2, kv2) == 3
        n2, out2 = c.retrieve(toks2)
        assert n2 == 192 and np.array_equal(out2, kv2[:, :, :192])


# ---------------------------------------------------------------- the async client, same host
def test_async_client_uses_the_shared_arena_and_retrieve_into(daemon):
    """The async client takes the same-host path too: stores through the arena, looks up in
    the presence index, reads leased extents into the caller's buffer; bit-exact, and
    interoperable with a sync client on the stream path."""
    import asyncio

    from kvstore_client import AsyncKVStoreClient

    ns = Namespace(**{**NS, "model": "async-shm"})
    toks = list(range(64 * 4 + 30))
    kv = kv_for(len(toks), 31)

    async def run():
        async with await AsyncKVStoreClient.connect(daemon.addr, ns, local=True) as c:
            assert c.transport == "shm" and c.presence is not None
            assert await c.store(toks, kv) == 4
            assert await c.store(toks, kv) == 0            # ReserveWrite reports them present
            hit = await c.lookup(toks)
            assert hit.matched_chunks == 4 and set(hit.tiers) <= {Tier.DRAM, Tier.DISK}
            n, out = await c.retrieve(toks)
            assert n == 256 and np.array_equal(out, kv[:, :, :256])
            buf = np.full((4, 2, 256, 2, 32), 7, np.float16)
            assert await c.retrieve_into(toks, buf) == 256
            assert np.array_equal(buf, kv[:, :, :256])
            await c.delete([c.keys(toks)[2]])
            buf[...] = 7
            assert await c.retrieve_into(toks, buf) == 128
            assert np.array_equal(buf[:, :, :128], kv[:, :, :128])
            assert (buf[:, :, 128:] == 7).all()             # past the match: left as it was
            return c.namespace_id

    asyncio.run(run())
    with KVStoreClient(daemon.addr, ns, local=False) as stream:
        n, out = stream.retrieve(toks)
        assert n == 128 and np.array_equal(out, kv[:, :, :128])


def test_async_client_outlives_a_daemon_restart(daemon_factory):
    import asyncio

    from kvstore_client import AsyncKVStoreClient, Durability

    d = daemon_factory()
    toks = list(range(64 * 2))
    kv = kv_for(len(toks), 32)

    async def run():
        async with await AsyncKVStoreClient.connect(d.addr, Namespace(**NS)) as c:
            assert c.transport == "shm"
            assert await c.store(toks, kv, durability=Durability.PERSISTED) == 2
            old = c.arena.path
            await asyncio.to_thread(d.restart)
            hit = await c.lookup(toks)                       # stale index noticed -> re-attached
            assert hit.matched_chunks == 2 and c.arena is not None and c.arena.path != old
            buf = np.zeros_like(kv)
            assert await c.retrieve_into(toks, buf) == 128 and np.array_equal(buf, kv)

    asyncio.run(run())


@pytest.mark.gpu
def test_async_client_moves_cuda_tensors_through_the_arena(daemon):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import asyncio

    from kvstore_client import AsyncKVStoreClient

    ns = Namespace(**{**NS, "model": "async-cuda", "dtype": "bfloat16"})
    toks = list(range(64 * 3))
    kv = torch.randn(ns.chunk_shape(len(toks)), device="cuda").to(torch.bfloat16)

    async def run():
        async with await AsyncKVStoreClient.connect(daemon.addr, ns, local=True) as c:
            assert await c.store(toks, kv) == 3
            out = torch.full_like(kv, float("nan"))
            assert await c.retrieve_into(toks, out) == 192
            assert torch.equal(out, kv)
            n, host = await c.retrieve(toks, as_torch=True)
            assert n == 192 and torch.equal(host, kv.cpu())

    asyncio.run(run())
