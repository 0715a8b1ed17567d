"""Bad requests get the right status and a message saying what to fix; stored data survives."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from kvstore_client import KVStoreClient
from kvstore_wire.crc import crc32c
from kvstore_wire._proto.kvstore.v1 import data_pb2, data_pb2_grpc

from .helpers import kv_for, smol_ns, tokens_for

NS = smol_ns("bad-input", num_layers=2)  # 2*2*256*3*64*2 = 393,216-byte chunks


@pytest.fixture(scope="module")
def setup(daemon):
    toks = tokens_for(256, seed=9)
    kv = kv_for(NS, 256, seed=9)
    with KVStoreClient(daemon.addr, NS) as c:
        c.store(toks, kv)
        yield c, toks, kv
    # every test below must leave the stored chunk intact
    with KVStoreClient(daemon.addr, NS) as c:
        n, out = c.retrieve(toks)
        assert n == 256 and np.array_equal(out, kv)


@pytest.fixture(scope="module")
def stub(daemon):
    with grpc.insecure_channel(daemon.addr) as ch:
        yield data_pb2_grpc.KVStoreStub(ch)


def _put(stub, msgs):
    with pytest.raises(grpc.RpcError) as e:
        stub.Put(iter(msgs))
    return e.value


def _header(c, key=None, **kw):
    fields = dict(namespace_id=c.namespace_id, key=key or bytes(range(32)), num_tokens=256, encoding=1,
                  payload_bytes=NS.chunk_bytes())
    fields.update(kw)
    return data_pb2.PutRequest(header=data_pb2.PutChunkHeader(**fields))


def _data(n, fill=1):
    return data_pb2.PutRequest(data=bytes([fill]) * n)


def test_wrong_payload_size_for_shape(setup, stub):
    c, *_ = setup
    e = _put(stub, [_header(c, payload_bytes=1000), _data(1000)])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "393216 bytes" in e.details() and "shape" in e.details()


def test_unknown_namespace(setup, stub):
    c, *_ = setup
    e = _put(stub, [_header(c, namespace_id=b"\x01" * 32), _data(10)])
    assert e.code() == grpc.StatusCode.NOT_FOUND and "RegisterNamespace" in e.details()
    with pytest.raises(grpc.RpcError) as e2:
        stub.Lookup(data_pb2.LookupRequest(namespace_id=b"\x02" * 32, keys=[b"k" * 32]))
    assert e2.value.code() == grpc.StatusCode.NOT_FOUND


def test_truncated_stream_stores_nothing(setup, stub):
    c, *_ = setup
    key = b"\x05" * 32
    e = _put(stub, [_header(c, key=key), _data(NS.chunk_bytes() - 1)])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in e.details()
    assert c.exists([key]) == [0]


def test_data_before_header(setup, stub):
    e = _put(stub, [_data(100)])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "before any header" in e.details()


def test_extra_data(setup, stub):
    c, *_ = setup
    key = b"\x06" * 32
    e = _put(stub, [_header(c, key=key), _data(NS.chunk_bytes()), _data(1)])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "send exactly" in e.details()


def test_oversize_payload(setup, stub):
    c, *_ = setup
    e = _put(stub, [_header(c, encoding=2, payload_bytes=10**12)])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_chunk_bytes" in e.details()
    e = _put(stub, [_header(c, num_tokens=300)])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "1..256" in e.details()


def test_bad_key_length(setup, stub):
    c, *_ = setup
    e = _put(stub, [_header(c, key=b"short"), _data(10)])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "32-byte" in e.details()
    with pytest.raises(grpc.RpcError) as e2:
        stub.Lookup(data_pb2.LookupRequest(namespace_id=c.namespace_id, keys=[b"x" * 31]))
    assert e2.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_wrong_crc_is_data_loss(setup, stub):
    c, *_ = setup
    key = b"\x07" * 32
    payload = bytes(NS.chunk_bytes())
    e = _put(stub, [_header(c, key=key, crc32c=crc32c(payload) ^ 1), data_pb2.PutRequest(data=payload)])
    assert e.code() == grpc.StatusCode.DATA_LOSS and "Nothing was stored" in e.details()
    assert c.exists([key]) == [0]


def test_too_many_keys(setup, stub):
    c, *_ = setup
    with pytest.raises(grpc.RpcError) as e:
        stub.Exists(data_pb2.ExistsRequest(namespace_id=c.namespace_id, keys=[b"k" * 32] * 5000))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_keys_per_request" in e.value.details()


def test_bad_namespace_spec(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.RegisterNamespace(data_pb2.RegisterNamespaceRequest(spec={"model": "", "dtype": 1, "num_layers": 2}))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model must be" in e.value.details() and "num_kv_heads" in e.value.details()


def test_client_rejects_wrong_shape_and_dtype(setup):
    c, toks, kv = setup
    from kvstore_client.errors import InvalidArgument
    with pytest.raises(InvalidArgument, match="shape"):
        c.store(toks, kv[:, :, :, :2])
    with pytest.raises(InvalidArgument, match="dtype"):
        c.store(toks, kv.astype(np.float32))
