"""Streams at the edge: per-tenant concurrent-stream quota and the stalled-stream deadline (issue 8)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from .conftest import ALICE, BOB, md, write_tokens


def _stalled_put(ch, token: str, release: threading.Event):
    def requests():
        release.wait(30)
        return
        yield  # noqa: unreachable - makes this a generator that sends nothing until released

    return ch.stream_unary("/kvstore.v1.KVStore/Put").future(requests(), metadata=md(token), timeout=30)


@pytest.fixture
def stream_daemon(daemon_factory, tmp_path):
    return daemon_factory(settings=(f'auth.tokens_file="{write_tokens(tmp_path / "t.toml")}"',
                                    "quotas.max_concurrent_streams=2", "quotas.max_stream_idle_s=3"))


def test_concurrent_streams_per_tenant(stream_daemon):
    release = threading.Event()
    with grpc.insecure_channel(stream_daemon.addr) as ch:
        held = [_stalled_put(ch, ALICE, release) for _ in range(2)]
        time.sleep(0.5)
        third = _stalled_put(ch, ALICE, release)
        with pytest.raises(grpc.RpcError) as e:
            third.result(timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "quotas.max_concurrent_streams=2" in e.value.details()
        # Bob is not affected by Alice's streams.
        bob = _stalled_put(ch, BOB, release)
        release.set()
        for f in held + [bob]:
            try:
                f.result(timeout=10)
            except grpc.RpcError as err:
                assert err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        # The slots come back when the streams end.
        time.sleep(0.2)
        ok = ch.stream_unary("/kvstore.v1.KVStore/Put")(iter([]), metadata=md(ALICE), timeout=10)
        assert ok is not None


def test_stalled_stream_is_cancelled(stream_daemon):
    release = threading.Event()
    with grpc.insecure_channel(stream_daemon.addr) as ch:
        t0 = time.monotonic()
        f = _stalled_put(ch, ALICE, release)
        with pytest.raises(grpc.RpcError) as e:
            f.result(timeout=20)
        waited = time.monotonic() - t0
        release.set()
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
        assert "quotas.max_stream_idle_s" in e.value.details()
        assert 2.5 < waited < 15, waited
    assert "Traceback" not in stream_daemon.log()


def test_get_reader_that_stops_reading_is_cancelled(stream_daemon):
    """A Get whose client reads nothing: the daemon ends it after max_stream_idle_s, stays healthy."""
    import numpy as np

    from kvstore_client import KVStoreClient
    from kvstore_wire._proto.kvstore.v1 import data_pb2

    ns = dict(model="stall/get", dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64, chunk_tokens=256)
    tokens = list(range(256 * 4))
    with KVStoreClient(stream_daemon.addr, ns, token=ALICE, local=False) as c:
        c.store(tokens, np.ones((30, 2, len(tokens), 3, 64), np.float16))  # 4 chunks of 5.9 MB
        keys, nid = c.keys(tokens), c.namespace_id
    with grpc.insecure_channel(stream_daemon.addr, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        call = ch.unary_stream("/kvstore.v1.KVStore/Get")(
            data_pb2.GetRequest(namespace_id=nid, keys=list(keys)).SerializeToString(),
            metadata=md(ALICE), timeout=60)
        next(call)  # read one message, then stop reading
        time.sleep(8)
        with pytest.raises(grpc.RpcError) as e:
            for _ in call:
                pass
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
        assert "read nothing" in e.value.details()
    stream_daemon.wait_serving()
    assert "Traceback" not in stream_daemon.log()
