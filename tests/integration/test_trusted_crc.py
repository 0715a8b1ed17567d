"""``trust_client_crc``: a principal's same-host commits are published with the CRC32Cs it sent
(the GPU data path computes them on the GPU), without the daemon re-reading the extents. Off by
default; other principals keep the re-read (a wrong checksum stores nothing)."""

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


def _reserve_fill_commit(addr, token, first_token: int, crc_of=None):
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
            return stub.CommitWrite(local_pb2.CommitWriteRequest(lease_id=r.lease_id, crc32c=[crc]), metadata=md)


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
