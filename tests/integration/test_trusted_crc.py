"""``trust_client_crc``: a principal's same-host commits are published with the CRC32Cs it sent
(the GPU data path computes them on the GPU), without the daemon re-reading the extents. Off by
default; other principals keep the re-read (a wrong checksum stores nothing).

Per request, any same-host writer may ask for the same (``CommitWriteRequest.skip_verify``, what
the GPU path sends), and a reader that checks what it copies may skip the daemon's read check
(``LeaseReadRequest.client_verifies``). Either way a chunk whose bytes do not match its CRC32C
is never served by a verified read: it is dropped."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

import kvstore_native as native
from kvstore import config as cfg
from kvstore_client import KVStoreClient, Namespace
from kvstore_testing.daemon import spawn_daemon
from kvstore_wire._proto.kvstore.v1 import local_pb2, local_pb2_grpc

TRUSTED = "gpu-engine-trusted-0123456789ab"
PLAIN = "cpu-engine-plain-0123456789abcd"
NS = dict(model="trusted-crc", dtype="float16", num_layers=4, num_kv_heads=2, head_dim=32, chunk_tokens=64)


@pytest.fixture(scope="module")
def trust_daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("kvstore-trust")
    tokens = base / "tokens.toml"
    tokens.write_text("[tokens]\n"
                      f'"{TRUSTED}" = {{ tenant = "eng", local_path = true, trust_client_crc = true }}\n'
                      f'"{PLAIN}" = {{ tenant = "eng", local_path = true }}\n')
    d = spawn_daemon(base_dir=base, settings=["dram.capacity_bytes=64MiB", "disk.enabled=false", 'metrics.listen=""',
                                              f'auth.tokens_file="{tokens}"'])
    yield d
    d.stop()


def _reserve_fill_commit(addr, token, first_token: int, crc_of=None, skip_verify: bool = False):
    """Reserves one chunk, fills it with ones, commits with ``crc_of(extent)`` (default: its CRC)."""
    md = (("authorization", f"Bearer {token}"),)
    with KVStoreClient(addr, Namespace(**NS), token=token) as c:
        assert c.transport == "shm"
        key = c.keys(list(range(first_token, first_token + 64)))[0]
        with grpc.insecure_channel(addr) as ch:
            stub = local_pb2_grpc.LocalDataStub(ch)
            r = stub.ReserveWrite(local_pb2.ReserveWriteRequest(namespace_id=c.namespace_id, chunks=[
                local_pb2.ChunkToWrite(key=key, num_tokens=64, encoding=1, payload_bytes=c.namespace.chunk_bytes())]),
                metadata=md)
            ext = c.arena.view(r.slots[0].offset, r.slots[0].length)
            ext[:] = 1
            crc = (crc_of or native.crc32c)(ext)
            return stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id, crc32c=[crc],
                                                                 skip_verify=skip_verify), metadata=md)


def test_trusted_principal_commits_without_a_re_read(trust_daemon):
    resp = _reserve_fill_commit(trust_daemon.addr, TRUSTED, 0)
    assert resp.stored == 1
    with KVStoreClient(trust_daemon.addr, Namespace(**NS), token=TRUSTED) as c:
        out = np.zeros(c.namespace.chunk_shape(64), np.float16)
        assert c.retrieve_into(list(range(64)), out) == 64
        assert (out.view(np.uint8) == 1).all()


def test_trusted_principal_is_taken_at_its_word(trust_daemon):
    # A wrong checksum is published as sent (the guarantee rests on the client) ...
    assert _reserve_fill_commit(trust_daemon.addr, TRUSTED, 1000, crc_of=lambda ext: 12345).stored == 1
    # ... and the daemon's verified reads then drop the chunk instead of serving it.
    with KVStoreClient(trust_daemon.addr, Namespace(**NS), token=TRUSTED) as c:
        out = np.zeros(c.namespace.chunk_shape(64), np.float16)
        assert c.retrieve_into(list(range(1000, 1064)), out) == 0


def test_other_principals_keep_the_re_read(trust_daemon):
    with pytest.raises(grpc.RpcError) as e:
        _reserve_fill_commit(trust_daemon.addr, PLAIN, 2000, crc_of=lambda ext: 12345)
    assert e.value.code() == grpc.StatusCode.DATA_LOSS


def test_trust_needs_local_path():
    with pytest.raises(ValueError, match="trust_client_crc = true needs local_path"):
        cfg.TokenEntry(tenant="x", trust_client_crc=True)
    with pytest.raises(ValueError, match="trust_client_crc = true needs local_path"):
        cfg.CertEntry(tenant="x", trust_client_crc=True)


def test_skip_verify_is_taken_unread_and_verified_reads_drop_a_mismatch(trust_daemon):
    assert _reserve_fill_commit(trust_daemon.addr, PLAIN, 3000, skip_verify=True).stored == 1
    assert _reserve_fill_commit(trust_daemon.addr, PLAIN, 4000, crc_of=lambda ext: 12345, skip_verify=True).stored == 1
    with KVStoreClient(trust_daemon.addr, Namespace(**NS), token=PLAIN) as c:
        out = np.zeros(c.namespace.chunk_shape(64), np.float16)
        assert c.retrieve_into(list(range(3000, 3064)), out) == 64 and (out.view(np.uint8) == 1).all()
        assert c.retrieve_into(list(range(4000, 4064)), out) == 0     # dropped, not served
        assert c.lookup(list(range(4000, 4064))).matched_chunks == 0


def _lease(stub, c, key, token, client_verifies):
    md = (("authorization", f"Bearer {token}"),)
    r = stub.LeaseRead(local_pb2.LeaseReadRequest(namespace_id=c.namespace_id, keys=[key],
                                                  client_verifies=client_verifies), metadata=md)
    if r.lease_id:
        stub.Release(local_pb2.ReleaseRequest(lease_ids=[r.lease_id]), metadata=md)
    return r.extents[0]


def test_client_verified_leases_skip_the_daemon_check_and_a_plain_lease_drops_the_bad_copy(trust_daemon):
    toks = list(range(5000, 5064))
    with KVStoreClient(trust_daemon.addr, Namespace(**NS), token=PLAIN) as c, \
            grpc.insecure_channel(trust_daemon.addr) as ch:
        stub = local_pb2_grpc.LocalDataStub(ch)
        kv = np.full(c.namespace.chunk_shape(64), 2.0, np.float16)
        assert c.store(toks, kv) == 1
        key = c.keys(toks)[0]
        ext = _lease(stub, c, key, PLAIN, client_verifies=False)
        assert ext.found and native.crc32c(c.arena.view(ext.offset, ext.length)) == ext.crc32c
        c.arena.view(ext.offset, 16)[:] = 9              # the arena copy goes bad after it was stored
        got = _lease(stub, c, key, PLAIN, client_verifies=True)
        # Leased unchecked: the reader sees the mismatch itself against the stored CRC32C.
        assert got.found and got.offset == ext.offset and got.crc32c == ext.crc32c
        assert native.crc32c(c.arena.view(got.offset, got.length)) != got.crc32c
        # What the GPU path does next: read it once through the daemon's check, which drops it.
        assert not _lease(stub, c, key, PLAIN, client_verifies=False).found
        assert not _lease(stub, c, key, PLAIN, client_verifies=True).found
        assert c.lookup(toks).matched_chunks == 0
        assert c.store(toks, kv) == 1 and _lease(stub, c, key, PLAIN, client_verifies=True).found
