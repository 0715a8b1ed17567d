"""Time to first token versus cached-prefix length, and the adapter's cost on a miss.

    python bench/ttft.py                                  # spawns a daemon on a temp dir
    python bench/ttft.py --addr 127.0.0.1:50051           # against a running daemon (admin token if auth is on)
    python bench/ttft.py --lengths 512,1024 --repeats 3   # shorter

For each cached-prefix length L (whole chunks) the prompt is L + ``--tail`` tokens of
natural-language text (SmolLM2-135M-Instruct, fp32, batch 1). Per repeat, with a fresh
namespace so nothing leaks between repeats:

- ``plain``: the model alone (no store anywhere): the no-cache baseline;
- ``miss``:  the adapter on an empty store (lookup misses, full prefill, store in the background);
- ``dram``:  the adapter again: the prefix comes back from DRAM, only the tail is prefilled;
- ``disk``:  the prefix's chunks are evicted from DRAM through the admin API (they were
  stored PERSISTED, so disk holds them); the adapter hits disk.

Medians over repeats. The miss-path cost is printed two ways: the TTFT difference
``miss - plain`` (noisy on a shared CPU), and the time the adapter itself spends before the
prefill on a miss (cache set-up + one lookup round trip), measured inside every call.
Goal: < 1% of TTFT. Stores are off the critical path (background thread, after the first token).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import statistics
import sys
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from kvstore_client import Durability, Tier  # noqa: E402
from kvstore_client.client import KVStoreClient  # noqa: E402
from kvstore_client.engines.transformers import KVCacheAdapter, namespace_for, plain_generate  # noqa: E402
from kvstore_testing import smollm2  # noqa: E402
from kvstore_testing.daemon import QUIET_SETTINGS, spawn_daemon  # noqa: E402
from kvstore_testing.demo import evict_dram  # noqa: E402

DEFAULT_LENGTHS = "512,1024,2048,4096,8192"
#: Uncached prompt tokens after the prefix: a question's worth.
DEFAULT_TAIL = 32
#: Seconds a spawned daemon may take to flush its disk tier and exit.
DAEMON_STOP_TIMEOUT_S = 30.0


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(args: argparse.Namespace, addr: str) -> None:
    lm = smollm2.load()
    base_ns = namespace_for(lm.model, chunk_tokens=args.chunk_tokens, model_id=lm.model_id)
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"# model {lm.model_id}  dtype {lm.model.dtype}  torch threads {torch.get_num_threads()}  "
          f"chunk {args.chunk_tokens}  tail {args.tail}  repeats {args.repeats}")
    rows = []
    miss_added: list[tuple[float, float]] = []  # (adapter time before prefill, plain TTFT)
    for L in lengths:
        if L % args.chunk_tokens:
            raise SystemExit(f"length {L} is not a multiple of --chunk-tokens {args.chunk_tokens}")
        s = {k: [] for k in ("plain", "miss", "dram", "disk", "dram_ret", "disk_ret", "added")}
        for rep in range(args.repeats):
            # A fresh preamble per repeat: nothing cached by the model runtime or the daemon carries over.
            ids = smollm2.long_prompt_ids(lm.tokenizer, L + args.tail, preamble=f"[{uuid.uuid4().hex[:8]}]\n")
            ids = ids[: L + args.tail] if len(ids) > L + args.tail else ids
            ns = dataclasses.replace(base_ns, model=f"{base_ns.model}#ttft-{uuid.uuid4().hex[:8]}")
            client = KVStoreClient(addr, ns, token=args.token)
            adapter = KVCacheAdapter(lm.model, client, store_durability=Durability.PERSISTED)
            # Alternate the order: on a shared CPU, drift would otherwise be charged to one side.
            if rep % 2 == 0:
                plain = plain_generate(lm.model, ids, max_new_tokens=1)
                miss = adapter.generate(ids, max_new_tokens=1)
            else:
                miss = adapter.generate(ids, max_new_tokens=1)
                plain = plain_generate(lm.model, ids, max_new_tokens=1)
            adapter.flush()
            assert miss.matched_tokens == 0 and miss.tokens == plain.tokens
            dram = adapter.generate(ids, max_new_tokens=1)
            evicted = evict_dram(client, ids, args.token)
            disk = adapter.generate(ids, max_new_tokens=1)
            for name, r in (("dram", dram), ("disk", disk)):
                if r.matched_tokens != L or r.tokens != plain.tokens:
                    print(f"warning: L={L} {name}: matched {r.matched_tokens}, same token {r.tokens == plain.tokens}",
                          file=sys.stderr)
            if disk.hit_tier != Tier.DISK:
                print(f"warning: L={L}: after evicting {evicted} chunks from DRAM the hit came from "
                      f"{disk.hit_tier.name}", file=sys.stderr)
            s["plain"].append(plain.ttft_s)
            s["miss"].append(miss.ttft_s)
            s["dram"].append(dram.ttft_s)
            s["disk"].append(disk.ttft_s)
            s["dram_ret"].append(dram.retrieve_s)
            s["disk_ret"].append(disk.retrieve_s)
            s["added"].append(miss.lookup_s)
            miss_added.append((miss.lookup_s, plain.ttft_s))
            client.delete(client.keys(ids))
            adapter.close()
            client.close()
            print(f"  L={L} rep {rep}: plain {plain.ttft_s:.3f}s miss {miss.ttft_s:.3f}s dram {dram.ttft_s:.3f}s "
                  f"({dram.hit_tier.name}) disk {disk.ttft_s:.3f}s ({disk.hit_tier.name})", flush=True)
        rows.append((L, {k: med(v) for k, v in s.items()}))

    print()
    print("TTFT (median of %d), SmolLM2-135M fp32 on %s, prompt = cached prefix + %d new tokens"
          % (args.repeats, "this CPU" if lm.model.device.type == "cpu" else lm.model.device, args.tail))
    hdr = (f"{'prefix':>6} | {'no cache (plain)':>16} | {'adapter miss':>12} {'vs plain':>8} | "
           f"{'DRAM hit':>9} {'speedup':>7} {'retrieve':>9} | {'disk hit':>9} {'speedup':>7} {'retrieve':>9}")
    print(hdr)
    print("-" * len(hdr))
    for L, m in rows:
        print(f"{L:>6} | {m['plain']:>15.3f}s | {m['miss']:>11.3f}s {(m['miss'] / m['plain'] - 1) * 100:>+7.1f}% | "
              f"{m['dram']:>8.3f}s {m['plain'] / m['dram']:>6.1f}x {m['dram_ret'] * 1e3:>7.1f}ms | "
              f"{m['disk']:>8.3f}s {m['plain'] / m['disk']:>6.1f}x {m['disk_ret'] * 1e3:>7.1f}ms")
    print()
    print("Miss path: time the adapter adds before the prefill (DynamicCache set-up + one Lookup round trip)")
    for L, m in rows:
        print(f"{L:>6}: {m['added'] * 1e3:7.2f} ms = {m['added'] / m['plain'] * 100:.3f}% of the plain TTFT")
    worst = max(a / p for a, p in miss_added)
    print(f"worst single run: {worst * 100:.3f}% of TTFT (goal < 1%)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", help="a running daemon (default: spawn one on a temp dir)")
    p.add_argument("--token", default=os.environ.get("KVSTORE_TOKEN"), help="admin-capable token if auth is on")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tail", type=int, default=DEFAULT_TAIL)
    p.add_argument("--chunk-tokens", type=int, default=256)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops a spawned daemon
    if args.addr:
        run(args, args.addr)
        return 0
    with spawn_daemon(settings=QUIET_SETTINGS, stop_timeout_s=DAEMON_STOP_TIMEOUT_S) as d:
        run(args, d.addr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
