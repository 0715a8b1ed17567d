"""Reliability benchmark (not in CI): crash/restart cycles and a corruption campaign.

    python bench/reliability.py                      # 100 kill cycles + the full campaign
    python bench/reliability.py --cycles 20 --trials 1

1. **Kill/restart cycles**: a real daemon on one data dir; per cycle, two writers store
   PERSISTED chunks (one over the same-host shared-memory path, one over the gRPC stream
   path) while the daemon is SIGKILLed at a random moment; after the restart every chunk
   acknowledged so far must be served bit-exact, and a chunk in flight at the kill must be
   absent or exact, never garbage.
2. **Corruption campaign**: per damage kind and trial, a fresh data dir with PERSISTED
   chunks, the daemon stopped, the damage applied (to chunk files or to the LMDB index), the
   daemon restarted. Counted: did it start, intact chunks served, damaged chunks served
   (must be 0).

3. **Arena campaign**: per trial, a running daemon with PERSISTED chunks held in its DRAM arena
   (and on disk); random bytes of the shared arena file are flipped from outside (as a stray
   writer or failing RAM would), then every chunk is read over the stream path and over the
   same-host path. Counted: chunks served bit-exact (from disk after the bad DRAM copy is
   dropped), damaged bytes served (must be 0), DRAM copies dropped as corrupt.

Prints one summary table per part. Exit status 1 when any acknowledged chunk was lost or any
damaged byte was served. (The 64-client soak is ``bench/soak.py``.)
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore_testing.ports import free_port

from kvstore_client import Durability, KVStoreClient, Namespace  # noqa: E402
from kvstore_client.errors import KVStoreClientError  # noqa: E402

#: Small chunks so a cycle stores many: 1 layer x 2 x 64 tokens x 2 heads x 64 dims x fp16 = 32 KiB.
NS = Namespace(model="bench/reliability", dtype="float16", num_layers=1, num_kv_heads=2, head_dim=64,
               chunk_tokens=64)
STARTUP_TIMEOUT_S = 60.0
PAGE = 4096


def _tokens(i: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(i).integers(0, 49152, NS.chunk_tokens)]


def _kv(i: int) -> np.ndarray:
    return np.random.default_rng(10**6 + i).standard_normal(NS.chunk_shape(NS.chunk_tokens)).astype(np.float16)


class Daemon:
    """A daemon process on a data dir that outlives it (restartable)."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.data_dir, self.log_path = data_dir, log
        self.proc: subprocess.Popen | None = None
        self.addr = ""

    def start(self) -> bool:
        self.addr = f"127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "kvstore.cli.daemon", "serve", "--data-dir", str(self.data_dir),
               "--listen", self.addr, "--set", 'metrics.listen=""', "--set", "dram.capacity_bytes=64MiB",
               "--set", "server.shutdown_grace_s=0"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with grpc.insecure_channel(self.addr) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return True
                except grpc.RpcError:
                    time.sleep(0.05)
        self.kill()
        return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)


@dataclass
class CycleStats:
    cycles: int = 0
    acked: int = 0
    in_flight: int = 0
    lost: int = 0           # acknowledged, then missing or different after a restart
    garbage: int = 0        # served bytes that differ from what was stored
    failed_starts: int = 0
    start_s: list[float] = field(default_factory=list)


def _writer(addr: str, local: bool, ids: list[int], acked: list[int], attempted: list[int]) -> None:
    try:
        with KVStoreClient(addr, NS, timeout_s=10, local=local) as c:
            for i in ids:
                attempted.append(i)
                c.store(_tokens(i), _kv(i), durability=Durability.PERSISTED)
                acked.append(i)
    except (KVStoreClientError, grpc.RpcError, OSError):
        pass   # the daemon was killed under us


def _check(addr: str, ids, st: CycleStats, must: bool) -> None:
    with KVStoreClient(addr, NS, timeout_s=30, local=False) as c:
        for i in ids:
            n, out = c.retrieve(_tokens(i))
            if n == 0:
                st.lost += must
            elif not np.array_equal(out.view(np.uint16), _kv(i).view(np.uint16)):
                st.garbage += 1


def kill_cycles(n: int, work: Path, rng: random.Random) -> CycleStats:
    """Start; then per cycle: write, SIGKILL, restart, check. The restarted daemon takes the next
    cycle's writes, so every start is also a recovery from a kill."""
    st = CycleStats()
    d = Daemon(work / "data", work / "cycles.log")
    if not d.start():
        raise RuntimeError("the daemon did not start on an empty data dir")
    all_acked: list[int] = []
    next_id = 0
    for _ in range(n):
        acked: list[int] = []
        attempted: list[int] = []
        ids = list(range(next_id, next_id + 2000))
        next_id += 2000
        ts = [threading.Thread(target=_writer, args=(d.addr, local, ids[k::2], acked, attempted))
              for k, local in enumerate((True, False))]
        for t in ts:
            t.start()
        time.sleep(rng.uniform(0.05, 0.6))
        d.kill()
        for t in ts:
            t.join(30)
        st.cycles += 1
        st.acked += len(acked)
        inflight = sorted(set(attempted) - set(acked))
        st.in_flight += len(inflight)
        older = rng.sample(all_acked, min(64, len(all_acked)))
        all_acked += acked
        t0 = time.monotonic()
        while not d.start():
            st.failed_starts += 1
            if st.failed_starts > n:
                raise RuntimeError(f"the daemon does not start any more; see {d.log_path}")
        st.start_s.append(time.monotonic() - t0)
        _check(d.addr, acked + older, st, must=True)   # this cycle's, and a sample of all before
        _check(d.addr, inflight, st, must=False)
    d.kill(signal.SIGTERM)
    return st


# -- corruption campaign ----------------------------------------------------------------------
def _flip(b: bytearray, at: int, n: int) -> None:
    for i in range(at, min(at + n, len(b))):
        b[i] ^= 0xFF


def _damage_file(kind: str, f: Path, rng: random.Random) -> None:
    b = bytearray(f.read_bytes())
    if kind == "chunk: flip payload byte":
        _flip(b, rng.randrange(len(b) // 2, len(b)), 1)
    elif kind == "chunk: flip header byte":
        _flip(b, rng.randrange(0, 40), 1)
    elif kind == "chunk: truncate":
        b = b[:rng.randrange(1, len(b))]
    elif kind == "chunk: zero":
        b = bytearray(len(b))
    elif kind == "chunk: random":
        b = bytearray(rng.randbytes(len(b)))
    f.write_bytes(bytes(b))


def _damage_index(kind: str, f: Path, rng: random.Random) -> None:
    b = bytearray(f.read_bytes())
    if kind == "index: flipped bytes":
        for _ in range(32):
            _flip(b, rng.randrange(len(b)), 1)
    elif kind == "index: zeroed meta pages":
        b[:2 * PAGE] = bytes(2 * PAGE)
    elif kind == "index: truncated to half":
        b = b[:len(b) // 2]
    elif kind == "index: random contents":
        b = bytearray(rng.randbytes(len(b)))
    elif kind == "index: version mismatch":
        for p in (0, PAGE):
            b[p + 20:p + 24] = (999).to_bytes(4, "little")
    elif kind == "index: deleted":
        for x in f.parent.iterdir():
            x.unlink()
        return
    f.write_bytes(bytes(b))


CHUNK_KINDS = ["chunk: flip payload byte", "chunk: flip header byte", "chunk: truncate", "chunk: zero",
               "chunk: random"]
INDEX_KINDS = ["index: flipped bytes", "index: zeroed meta pages", "index: truncated to half",
               "index: random contents", "index: version mismatch", "index: deleted"]
CHUNKS_PER_TRIAL = 24
DAMAGED_PER_TRIAL = 4


@dataclass
class Campaign:
    trials: int = 0
    started: int = 0
    intact_served: int = 0
    intact_total: int = 0
    damaged_served: int = 0
    garbage: int = 0


def campaign(kind: str, trials: int, work: Path, rng: random.Random) -> Campaign:
    r = Campaign()
    for t in range(trials):
        d = Daemon(work / f"{kind.replace(' ', '_').replace(':', '')}-{t}", work / "campaign.log")
        if not d.start():
            raise RuntimeError("a fresh daemon did not start")
        ids = list(range(10**7 + t * 1000, 10**7 + t * 1000 + CHUNKS_PER_TRIAL))
        names: dict[int, str] = {}      # chunk file name = hex(namespace id || key)
        with KVStoreClient(d.addr, NS, local=False) as c:
            for i in ids:
                c.store(_tokens(i), _kv(i), durability=Durability.PERSISTED)
                names[i] = (c.namespace_id + c.keys(_tokens(i))[0]).hex()
        d.kill(signal.SIGTERM)
        damaged: set[int] = set()
        if kind.startswith("chunk"):
            for i in rng.sample(ids, DAMAGED_PER_TRIAL):
                name = names[i]
                _damage_file(kind, d.data_dir / "chunks" / name[:2] / name, rng)
                damaged.add(i)
        else:
            _damage_index(kind, d.data_dir / "index.lmdb" / "data.mdb", rng)
        r.trials += 1
        if not d.start():
            continue
        r.started += 1
        with KVStoreClient(d.addr, NS, local=False) as c:
            for i in ids:
                n, out = c.retrieve(_tokens(i))
                if n and not np.array_equal(out.view(np.uint16), _kv(i).view(np.uint16)):
                    r.garbage += 1
                if i in damaged:
                    r.damaged_served += bool(n)
                else:
                    r.intact_total += 1
                    r.intact_served += bool(n)
        d.kill(signal.SIGTERM)
    return r


@dataclass
class ArenaCampaign:
    trials: int = 0
    flips: int = 0
    reads: int = 0
    exact: int = 0
    garbage: int = 0
    misses: int = 0
    dropped: int = 0


def _dram_corrupt(addr: str) -> int:
    from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc

    with grpc.insecure_channel(addr) as ch:
        st = admin_pb2_grpc.AdminStub(ch).GetStats(admin_pb2.GetStatsRequest(), timeout=10)
    return sum(t.corrupt for t in st.tiers if t.tier == 2)   # Tier.DRAM


def arena_campaign(trials: int, flips: int, work: Path, rng: random.Random) -> ArenaCampaign:
    r = ArenaCampaign()
    for t in range(trials):
        d = Daemon(work / f"arena-{t}", work / "campaign.log")
        if not d.start():
            raise RuntimeError("a fresh daemon did not start")
        try:
            ids = list(range(2 * 10**7 + t * 1000, 2 * 10**7 + t * 1000 + CHUNKS_PER_TRIAL))
            with KVStoreClient(d.addr, NS, local=False) as c:
                for i in ids:
                    c.store(_tokens(i), _kv(i), durability=Durability.PERSISTED)
            arena = Path(f"/dev/shm/kvstore-{d.proc.pid}.arena")
            if not arena.exists():
                raise RuntimeError(f"{arena} is missing: the campaign needs the shared arena (dram.shm_name=auto)")
            size = arena.stat().st_size
            with open(arena, "r+b") as f:      # the daemon's own uid may write its arena file
                # Flip bytes in the region the chunks occupy (they are allocated from the start,
                # after the header page), so most flips land in a stored chunk.
                used = min(size, PAGE * 16 + len(ids) * (NS.chunk_bytes(NS.chunk_tokens) + 64 * 1024))
                for _ in range(flips):
                    at = rng.randrange(PAGE * 16, used)
                    f.seek(at)
                    b = f.read(1)
                    f.seek(at)
                    f.write(bytes([b[0] ^ (1 << rng.randrange(8))]))
            r.trials += 1
            r.flips += flips
            for local in (False, True):
                with KVStoreClient(d.addr, NS, local=local) as c:
                    for i in ids:
                        n, out = c.retrieve(_tokens(i))
                        r.reads += 1
                        if not n:
                            r.misses += 1
                        elif np.array_equal(out.view(np.uint16), _kv(i).view(np.uint16)):
                            r.exact += 1
                        else:
                            r.garbage += 1
            r.dropped += _dram_corrupt(d.addr)
        finally:
            d.kill(signal.SIGTERM)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--trials", type=int, default=3, help="trials per damage kind")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--arena-flips", type=int, default=20, help="bytes flipped in the arena per trial")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory(prefix="kvstore-reliability-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        st = kill_cycles(a.cycles, work, rng)
        print(f"\nkill/restart cycles ({time.monotonic() - t0:.0f}s; PERSISTED writes over the shared-memory "
              "and the stream path; SIGKILL at a random moment)")
        ss = sorted(st.start_s) or [0.0]
        print(f"| cycles | acknowledged | in flight at kill | acknowledged lost | garbage served | failed starts "
              f"| start p50 / max |\n| --- | --- | --- | --- | --- | --- | --- |\n| {st.cycles} | {st.acked} | "
              f"{st.in_flight} | {st.lost} | {st.garbage} | {st.failed_starts} | {ss[len(ss) // 2]:.2f}s / "
              f"{ss[-1]:.2f}s |")
        print(f"\ncorruption campaign ({a.trials} trials per kind, {CHUNKS_PER_TRIAL} PERSISTED chunks per trial, "
              f"{DAMAGED_PER_TRIAL} damaged per chunk-file trial)")
        print("| damage | daemon started | intact chunks served | damaged chunks served | garbage served |\n"
              "| --- | --- | --- | --- | --- |")
        bad = st.lost + st.garbage + st.failed_starts
        for kind in CHUNK_KINDS + INDEX_KINDS:
            c = campaign(kind, a.trials, work, rng)
            print(f"| {kind} | {c.started}/{c.trials} | {c.intact_served}/{c.intact_total} | {c.damaged_served} | "
                  f"{c.garbage} |", flush=True)
            bad += (c.trials - c.started) + c.damaged_served + c.garbage + (c.intact_total - c.intact_served)
        a_ = arena_campaign(a.trials, a.arena_flips, work, rng)
        print(f"\narena campaign ({a.trials} trials, {a.arena_flips} bytes flipped in the shared DRAM arena per trial, "
              f"{CHUNKS_PER_TRIAL} PERSISTED chunks read over the stream and the same-host path)")
        print("| trials | bytes flipped | reads | served bit-exact | damaged served | misses | DRAM copies dropped |\n"
              "| --- | --- | --- | --- | --- | --- | --- |\n"
              f"| {a_.trials} | {a_.flips} | {a_.reads} | {a_.exact} | {a_.garbage} | {a_.misses} | {a_.dropped} |")
        bad += a_.garbage + a_.misses
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
