"""DRAM integrity against a real daemon: a bit flipped in the shared arena (mapped from
/dev/shm by this process, the daemon's uid, as any same-host client can) is never served,
over the stream path or the same-host path. The corrupt copy is dropped and counted in
``Admin.GetStats``; the good disk copy is served instead, or the chunk is a miss."""

from __future__ import annotations

import grpc
import numpy as np

from kvstore_client import KVStoreClient, Namespace
from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc, data_pb2, data_pb2_grpc, local_pb2, local_pb2_grpc
from kvstore_wire.types import Durability

NS = dict(model="integrity-test", dtype="float16", num_layers=4, num_kv_heads=2, head_dim=32, chunk_tokens=64)
DRAM, DISK = 2, 3   # Tier enum numbers (proto common.Tier)


def kv_for(tokens: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, 2, tokens, 2, 32)).astype(np.float16)


def tier_stats(addr: str, tier: int):
    with grpc.insecure_channel(addr) as ch:
        stats = admin_pb2_grpc.AdminStub(ch).GetStats(admin_pb2.GetStatsRequest(), timeout=5)
    return next(t for t in stats.tiers if t.tier == tier)


def flip_in_arena(c: KVStoreClient, addr: str, key: bytes) -> None:
    """Finds ``key``'s extent with a LeaseRead, releases the lease and flips one bit there."""
    with grpc.insecure_channel(addr) as ch:
        stub = local_pb2_grpc.LocalDataStub(ch)
        lease = stub.LeaseRead(local_pb2.LeaseReadRequest(namespace_id=c.namespace_id, keys=[key]), timeout=10)
        ext = lease.extents[0]
        assert ext.found and ext.tier == DRAM
        stub.Release(local_pb2.ReleaseRequest(lease_ids=[lease.lease_id]), timeout=10)
    c.arena.view(ext.offset, ext.length)[ext.length // 3] ^= 0x04


def stream_get(addr: str, namespace_id: bytes, keys: list[bytes]):
    """(header, payload bytes) per key over the stream path (raw Get: the header's tier too)."""
    out, cur = [], None
    with grpc.insecure_channel(addr) as ch:
        for msg in data_pb2_grpc.KVStoreStub(ch).Get(data_pb2.GetRequest(namespace_id=namespace_id, keys=keys),
                                                     timeout=30):
            if msg.HasField("header"):
                cur = [msg.header, bytearray()]
                out.append(cur)
            else:
                cur[1] += msg.data
    return out


def test_a_flipped_bit_is_never_streamed_and_the_disk_copy_is(daemon_factory):
    d = daemon_factory()
    toks = list(range(64 * 3))
    kv = kv_for(len(toks), 11)
    with KVStoreClient(d.addr, Namespace(**NS)) as shm:
        assert shm.transport == "shm"
        assert shm.store(toks, kv, durability=Durability.PERSISTED) == 3
        keys = shm.keys(toks)
        flip_in_arena(shm, d.addr, keys[1])
        got = stream_get(d.addr, shm.namespace_id, keys)
        assert [h.found for h, _ in got] == [True, True, True]
        assert [h.tier for h, _ in got] == [DRAM, DISK, DRAM]          # chunk 1 came from disk
        expect = np.ascontiguousarray(kv[:, :, 64:128]).view(np.uint8).reshape(-1).tobytes()
        assert bytes(got[1][1]) == expect
        assert tier_stats(d.addr, DRAM).corrupt == 1
        # The good copy was promoted back into DRAM; both paths read it bit-exact.
        with KVStoreClient(d.addr, Namespace(**NS), local=False) as stream:
            n, out = stream.retrieve(toks)
            assert n == len(toks) and np.array_equal(out, kv)
        assert stream_get(d.addr, shm.namespace_id, keys[1:2])[0][0].tier == DRAM
        assert tier_stats(d.addr, DRAM).corrupt == 1


def test_the_same_host_path_never_returns_a_flipped_bit(daemon_factory):
    d = daemon_factory()
    toks = list(range(64 * 3))
    kv = kv_for(len(toks), 12)
    with KVStoreClient(d.addr, Namespace(**NS)) as shm:
        assert shm.store(toks, kv, durability=Durability.PERSISTED) == 3
        flip_in_arena(shm, d.addr, shm.keys(toks)[2])
        n, out = shm.retrieve(toks)       # the client's default: it does not re-check shared memory
        assert n == len(toks) and np.array_equal(out, kv)
        assert tier_stats(d.addr, DRAM).corrupt == 1


def test_without_a_disk_copy_a_flipped_chunk_is_a_miss(daemon_factory):
    d = daemon_factory(settings=("disk.enabled=false",))
    toks = list(range(64 * 3))
    kv = kv_for(len(toks), 13)
    with KVStoreClient(d.addr, Namespace(**NS)) as shm, KVStoreClient(d.addr, Namespace(**NS), local=False) as stream:
        assert shm.store(toks, kv) == 3
        flip_in_arena(shm, d.addr, shm.keys(toks)[1])
        n, out = stream.retrieve(toks)
        assert n == 64 and np.array_equal(out, kv[:, :, :64])      # the prefix before the bad chunk
        assert tier_stats(d.addr, DRAM).corrupt == 1
        assert shm.lookup(toks).matched_chunks == 1                # dropped: no longer advertised
        n2, out2 = shm.retrieve(toks)
        assert n2 == 64 and np.array_equal(out2, kv[:, :, :64])
