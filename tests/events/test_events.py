"""KV events: a ZMQ SUB decodes the documented msgpack batches; replay and snapshot catch a
late subscriber up."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from kvstore.config import EventEncoding, EventsConfig
from kvstore.events import END_SEQ, SNAPSHOT_REQUEST, KVEventPublisher, fan_out
from kvstore.types import ChunkId, Medium

RECV_TIMEOUT_MS = 5000


def _cfg(**kw) -> EventsConfig:
    base = dict(enabled=True, endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*",
                topic="kv", batch_interval_ms=10, block_size=16)
    base.update(kw)
    return EventsConfig(**base)


def _cid(i: int) -> ChunkId:
    return ChunkId(b"\x11" * 32 + i.to_bytes(32, "big"))


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def _sub(ctx, pub):
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
    s.setsockopt(zmq.SUBSCRIBE, b"kv")
    s.connect(pub.endpoint)
    return s


def _joined(sub, pub, ctx) -> None:
    """PUB drops messages until the subscription arrives: probe until one gets through."""
    deadline = time.monotonic() + 5
    probe = ChunkId(b"\x22" * 64)
    while time.monotonic() < deadline:
        pub.listener(probe, Medium.DRAM, True)
        try:
            sub.setsockopt(zmq.RCVTIMEO, 100)
            sub.recv_multipart()
            break
        except zmq.Again:
            continue
    sub.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
    pub.listener(probe, Medium.DRAM, False)
    time.sleep(0.05)
    while True:  # drain
        try:
            sub.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


def _replay(ctx, pub, request: bytes) -> list[tuple[int, bytes]]:
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
    d.connect(pub.replay_endpoint)
    d.send_multipart((b"", request))
    out = []
    while True:
        _, seq, payload = d.recv_multipart()
        if seq == END_SEQ:
            d.close()
            return out
        out.append((int.from_bytes(seq, "big"), payload))


def test_sub_receives_array_batches_in_the_documented_layout(ctx):
    pub = KVEventPublisher(_cfg(), ctx)
    sub = _sub(ctx, pub)
    try:
        _joined(sub, pub, ctx)
        for i in range(3):
            pub.listener(_cid(i), Medium.DRAM, True)
        pub.listener(_cid(0), Medium.DISK, True)
        pub.listener(_cid(1), Medium.DRAM, False)
        events = []
        while len(events) < 3:
            topic, seq, payload = sub.recv_multipart()
            assert topic == b"kv" and len(seq) == 8
            batch = msgpack.unpackb(payload)
            assert isinstance(batch, list) and len(batch) == 3
            ts, evs, dp_rank = batch
            assert isinstance(ts, float) and dp_rank == 0
            events += evs
        assert events[0] == ["BlockStored", [_cid(i)[32:] for i in range(3)], None, [], 16, None, "DRAM", None]
        assert events[1] == ["BlockStored", [_cid(0)[32:]], None, [], 16, None, "DISK", None]
        assert events[2] == ["BlockRemoved", [_cid(1)[32:]], "DRAM"]
    finally:
        sub.close()
        pub.close()


def test_map_encoding_and_u64_hashes(ctx):
    pub = KVEventPublisher(_cfg(encoding=EventEncoding.MAP, block_hash="u64"), ctx)
    sub = _sub(ctx, pub)
    try:
        _joined(sub, pub, ctx)
        pub.listener(_cid(7), Medium.REMOTE, True)
        batch = msgpack.unpackb(sub.recv_multipart()[2])
        assert set(batch) == {"ts", "events", "data_parallel_rank"}
        (ev,) = batch["events"]
        assert ev["type"] == "BlockStored" and ev["medium"] == "REMOTE"
        assert ev["block_hashes"] == [int.from_bytes(_cid(7)[32:40], "big")]
    finally:
        sub.close()
        pub.close()


def test_replay_returns_missed_batches_and_snapshot_catches_up(ctx):
    pub = KVEventPublisher(_cfg(), ctx)
    try:
        listener = fan_out(None, pub.listener)
        for i in range(5):
            listener(_cid(i), Medium.DRAM, True)
            time.sleep(0.03)   # separate batches
        listener(_cid(4), Medium.DRAM, False)
        time.sleep(0.1)
        got = _replay(ctx, pub, (0).to_bytes(8, "big"))
        seqs = [s for s, _ in got]
        assert seqs == list(range(len(seqs))) and len(seqs) >= 2
        replayed = [e for _, p in got for e in msgpack.unpackb(p)[1]]
        stored = [h for e in replayed if e[0] == "BlockStored" for h in e[1]]
        assert stored == [_cid(i)[32:] for i in range(5)]
        later = _replay(ctx, pub, seqs[-1].to_bytes(8, "big"))
        assert [s for s, _ in later] == [seqs[-1]]
        (snap_seq, snap), = _replay(ctx, pub, SNAPSHOT_REQUEST)
        assert snap_seq == seqs[-1]
        evs = msgpack.unpackb(snap)[1]
        assert evs[0] == ["AllBlocksCleared"]
        assert sorted(h for e in evs[1:] for h in e[1]) == [_cid(i)[32:] for i in range(4)]
        assert pub.stats().replays == 2 and pub.stats().snapshots == 1
    finally:
        pub.close()


def test_overflow_drops_and_resyncs(ctx):
    pub = KVEventPublisher(_cfg(queue_events=3, batch_interval_ms=200), ctx)
    try:
        for i in range(10):
            pub.listener(_cid(i), Medium.DISK, True)
        time.sleep(0.5)
        s = pub.stats()
        assert s.dropped_events == 7 and s.resyncs == 1
        (_, payload), = _replay(ctx, pub, (0).to_bytes(8, "big"))
        evs = msgpack.unpackb(payload)[1]
        assert evs[0] == ["AllBlocksCleared"] and len(evs[1][1]) == 10
    finally:
        pub.close()
