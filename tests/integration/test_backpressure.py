"""Honest backpressure against a real daemon: write-behind never makes a foreground store fail.

The short form of the 64-client soak (``bench/soak.py`` is the long one): 64 same-host
clients store SmolLM2-sized 5.9 MB chunks into a 256 MiB DRAM tier with write-behind to a
real disk tier (fsync on). No store may fail; every read returns the stored bytes or a miss;
skipped disk copies are counted the same in ``Admin.GetStats``, Prometheus and ``kvctl stats``.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from kvstore_client import KVStoreClient
from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc

from .helpers import free_port, kv_for, smol_ns, tokens_for

CLIENTS = 64
STORES_PER_CLIENT = 2
DRAM = "dram.capacity_bytes=256MiB"
#: Longest wait of a client for the others to finish storing (a hung client fails the test).
BARRIER_S = 180


def admin_stats(addr: str):
    with grpc.insecure_channel(addr) as ch:
        return admin_pb2_grpc.AdminStub(ch).GetStats(admin_pb2.GetStatsRequest(), timeout=10)


def prometheus_counter(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return float(next(line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")))


def kvctl_stats(addr: str) -> str:
    r = subprocess.run([sys.executable, "-m", "kvstore.cli.kvctl", "--addr", addr, "stats"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def soak(addr: str, ns, clients: int, stores: int, local: bool = True, interleave_reads: bool = True) -> dict:
    """``clients`` threads, each with its own client, storing ``stores`` chunks and reading
    each back (right after its store, or with ``interleave_reads=False`` once every client
    has stored all of its chunks: the issue's store-only pattern, then a check)."""
    failures: list[str] = []
    wrong = []
    lock = threading.Lock()
    stored_all = threading.Barrier(clients)

    def check(c, toks, kv, where) -> None:
        n, out = c.retrieve(toks)
        if n and not np.array_equal(out, kv):          # a miss is allowed (evicted), wrong bytes never
            with lock:
                wrong.append(where)

    def work(i: int) -> None:
        try:
            stores_then_reads(i)
        except threading.BrokenBarrierError:
            with lock:
                failures.append(f"client {i}: another client failed or hung before all had stored")
        except BaseException as e:  # noqa: BLE001 - any failure of a client is the test's failure
            with lock:
                failures.append(f"client {i}: {type(e).__name__}: {e}")
            stored_all.abort()      # the others stop waiting for this one

    def stores_then_reads(i: int) -> None:
        kv = kv_for(ns, ns.chunk_tokens, seed=i)
        with KVStoreClient(addr, ns, local=local) as c:
            done = []
            for j in range(stores):
                toks = tokens_for(ns.chunk_tokens, seed=i * 1000 + j)
                try:
                    assert c.store(toks, kv) == 1
                except Exception as e:  # noqa: BLE001 - collected and asserted on below
                    with lock:
                        failures.append(f"{type(e).__name__}: {e}")
                    continue
                if interleave_reads:
                    check(c, toks, kv, (i, j))
                else:
                    done.append((j, toks))
            stored_all.wait(timeout=BARRIER_S)
            for j, toks in done:
                check(c, toks, kv, (i, j))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(work, range(clients)))
    return dict(failures=failures, wrong=wrong)


def test_64_same_host_clients_never_fail_a_store_because_of_write_behind(daemon_factory):
    # The pattern of issue 9 (69% of these stores failed): same-host stores, write-behind on.
    port = free_port()
    d = daemon_factory(settings=(DRAM, "disk.capacity_bytes=2GiB", "disk.fsync=true",
                                 f'metrics.listen="127.0.0.1:{port}"'))
    res = soak(d.addr, smol_ns("soak"), CLIENTS, STORES_PER_CLIENT, interleave_reads=False)
    assert res["failures"] == [], "\n".join(res["failures"][:3])
    assert res["wrong"] == []
    st = admin_stats(d.addr)
    assert prometheus_counter(port, "kvstore_write_queue_dropped_total") == st.write_queue_dropped


def test_64_streaming_clients_reading_while_writing_never_fail_a_store(daemon_factory):
    # Readers hold leases too: a put DRAM has no room for is stored on disk (counted as spilled).
    port = free_port()
    d = daemon_factory(settings=(DRAM, "disk.capacity_bytes=2GiB", f'metrics.listen="127.0.0.1:{port}"'))
    res = soak(d.addr, smol_ns("stream-soak"), CLIENTS, 1, local=False)
    assert res["failures"] == [], "\n".join(res["failures"][:3])
    assert res["wrong"] == []
    prometheus_counter(port, "kvstore_puts_spilled_total")   # exported (how many depends on timing)


def test_a_full_write_queue_skips_the_disk_copy_and_says_so(daemon_factory):
    # A byte budget smaller than one chunk: every disk copy is skipped, every store succeeds.
    port = free_port()
    d = daemon_factory(settings=(DRAM, "chain.write_behind_fraction=0.01", f'metrics.listen="127.0.0.1:{port}"'))
    ns = smol_ns("skip")
    res = soak(d.addr, ns, 4, 2, local=False)
    assert res["failures"] == [] and res["wrong"] == []
    st = admin_stats(d.addr)
    assert st.write_queue_dropped == 8 and st.write_queue_depth == 0
    assert prometheus_counter(port, "kvstore_write_queue_dropped_total") == 8
    out = kvctl_stats(d.addr)
    assert "8 dropped" in out or "8 skipped" in out, out
    disk = next(t for t in st.tiers if t.tier == 3)
    assert disk.chunks == 0                       # the copies were skipped, not half-written
