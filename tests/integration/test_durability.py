"""Crash safety and corruption: SIGKILL mid-burst, restart; flipped bytes on disk."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from kvstore_client import Durability, KVStoreClient
from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc
from kvstore_client.errors import KVStoreClientError

from .helpers import kv_for, smol_ns, tokens_for

NS = smol_ns("durability", num_layers=2, num_kv_heads=3, head_dim=64)  # 393 KB chunks


def test_sigkill_mid_burst_every_acknowledged_chunk_survives(daemon_factory):
    d = daemon_factory()
    acked: list[int] = []
    attempted: list[int] = []
    payloads = {i: kv_for(NS, 256, seed=i) for i in range(400)}
    stop = threading.Event()

    def burst():
        try:
            with KVStoreClient(d.addr, NS, timeout_s=10) as c:
                for i in range(400):
                    if stop.is_set():
                        return
                    attempted.append(i)
                    c.store(tokens_for(256, seed=i), payloads[i], durability=Durability.PERSISTED)
                    acked.append(i)
        except KVStoreClientError:
            pass  # the daemon died under us: expected

    t = threading.Thread(target=burst)
    t.start()
    deadline = time.monotonic() + 20
    while len(acked) < 15 and time.monotonic() < deadline:
        time.sleep(0.01)
    d.kill(signal.SIGKILL)
    stop.set()
    t.join(30)
    assert len(acked) >= 15, "the burst did not get going before the kill"
    d.start()  # same data dir
    with KVStoreClient(d.addr, NS) as c:
        for i in acked:
            n, out = c.retrieve(tokens_for(256, seed=i))
            assert n == 256, f"acknowledged chunk {i} lost after SIGKILL"
            assert np.array_equal(out.view(np.uint16), payloads[i].view(np.uint16))
        for i in set(attempted) - set(acked):  # in flight at the kill: absent or intact, never garbage
            n, out = c.retrieve(tokens_for(256, seed=i))
            assert n == 0 or np.array_equal(out.view(np.uint16), payloads[i].view(np.uint16))


def _disk_corrupt(addr) -> int:
    with grpc.insecure_channel(addr) as ch:
        st = admin_pb2_grpc.AdminStub(ch).GetStats(admin_pb2.GetStatsRequest())
    return sum(t.corrupt for t in st.tiers)


def test_flipped_bytes_on_disk_are_a_counted_miss(daemon_factory):
    d = daemon_factory()
    toks = tokens_for(512, seed=77)
    kv = kv_for(NS, 512, seed=77)
    with KVStoreClient(d.addr, NS) as c:
        assert c.store(toks, kv, durability=Durability.PERSISTED) == 2
    d.stop()
    files = [p for p in Path(d.data_dir, "chunks").rglob("*") if p.is_file()]
    assert len(files) == 2
    for p in files:
        with open(p, "r+b") as f:
            size = p.stat().st_size
            for off in (size // 2, size - 10):
                f.seek(off)
                b = f.read(1)
                f.seek(off)
                f.write(bytes([b[0] ^ 0xFF]))
    d.start()
    assert _disk_corrupt(d.addr) == 0
    with KVStoreClient(d.addr, NS) as c:
        n, out = c.retrieve(toks)
        assert n == 0 and out.shape[2] == 0  # never returned
        assert _disk_corrupt(d.addr) >= 1
        assert c.lookup(toks).matched_chunks == 0
