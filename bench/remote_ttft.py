"""Time to first token on replica B: a prefix stored through replica A, fetched by B from the
shared Redis Cluster over a throttled link, against recomputing it on B.

Real parts: a loopback Redis Cluster (3 masters + 3 replicas), two ``kvstore serve`` daemons
(A direct, B through ``kvstore_testing.throttle``'s rate-limited proxy via
``remote.address_map``), the transformers adapter with SmolLM2-135M on the CPU. For each
codec setting (adaptive, or one ``remote.fixed_level``) and each link rate:

1. A stores the prompt's prefix (``--prefix-tokens``, whole chunks) in a fresh namespace and
   uploads it (at the fixed level, or the adaptive choice plus the small companion).
2. A fresh B (cold DRAM and disk) learns the link from 8 one-chunk warm-up fetches of other
   prefixes, then generates one token: lookup -> remote fetch -> promote -> retrieve -> prefill
   of the tail. TTFT is the adapter's ``ttft_s``.

Clients use the stream path (``local=False``): a run maps every fresh B's 2 GiB arena
otherwise, and one process holding all of them ran the box out of memory.

Recompute on B: the same prompt through the adapter against B with nothing stored (a miss:
lookup, which asks the remote, then the full prefill), and the plain model alone.

    python bench/remote_ttft.py [--prefix-tokens 4096] [--gbits 1 10 25] [--levels adaptive lossless ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from kvstore_client.client import KVStoreClient
from kvstore_client.engines.transformers import KVCacheAdapter, namespace_for, plain_generate
from kvstore_testing import smollm2
from kvstore_testing.redis_cluster import LocalRedisCluster
from kvstore_testing.throttle import ThrottledCluster

import sys
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from remote.replicas import TOK_X, replica, stats, uploads, wait_uploaded  # noqa: E402

CHUNK_TOKENS = 256
#: Warm-up fetches on a fresh B (one chunk each) so its throughput EWMA (alpha 0.2, prior
#: 10 Gbit/s) has converged to the link before the measured fetch.
WARM_FETCHES = 8
WARM_SHIFT = 16
LEVELS = ("adaptive", "lossless", "near-lossless", "default", "aggressive")
#: Remote deadline for B: long enough that a 190 MB prefix at 1 Gbit/s is not cut short.
TIMEOUT_MS = 20_000
#: Budget the adaptive controller plans for (us per token): a 4k prefix within ~0.2 s.
BUDGET_US_PER_TOKEN = 50.0


def _ns(lm, tag: str):
    return namespace_for(lm.model, chunk_tokens=CHUNK_TOKENS, model_id=f"{lm.model_id}#ttft-{tag}-{uuid.uuid4().hex[:8]}")


def _settings(level: str) -> list[str]:
    out = [f"remote.load_budget_us_per_token={BUDGET_US_PER_TOKEN}", "remote.min_quality=aggressive",
           "dram.capacity_bytes=2GiB", "disk.capacity_bytes=4GiB"]
    if level != "adaptive":
        out += [f'remote.fixed_level="{level}"', "remote.small_companion=false"]
    return out


def _store_on_a(a, lm, prompt, kv, tokens: int) -> object:
    ns = _ns(lm, "p")
    before = uploads(a)
    with KVStoreClient(a.addr, ns, token=TOK_X, local=False) as c:
        n = c.store(prompt[:tokens], kv[:, :, :tokens].contiguous().numpy())
    wait_uploaded(a, n, before)
    return ns


def run(args) -> None:
    lm = smollm2.load()
    prompt = smollm2.long_prompt_ids(lm.tokenizer, args.prefix_tokens + 64)
    tokens = args.prefix_tokens // CHUNK_TOKENS * CHUNK_TOKENS
    # The prompt's KV, computed once (what A's engine would have stored).
    import torch
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        kv = smollm2.cache_to_kv(out.past_key_values)
    plain = [plain_generate(lm.model, prompt, max_new_tokens=1).ttft_s for _ in range(args.reps)]
    rows, recompute = [], None
    tmp = Path(tempfile.mkdtemp(prefix="kvs-ttft-"))
    with ExitStack() as st:
        cluster = LocalRedisCluster(tmp / "redis").start()
        st.callback(cluster.stop)
        proxy = ThrottledCluster(cluster, args.gbits[0] * 1e9 / 8)
        st.callback(proxy.close)
        via_proxy = ["remote.nodes=[" + ", ".join(f'"{n}"' for n in proxy.nodes) + "]",
                     "remote.address_map={" + ", ".join(f'"{r}" = "{p}"' for r, p in zip(cluster.nodes, proxy.nodes))
                     + "}"]
        for level in args.levels:
            with replica(cluster, tmp / f"a-{level}", "a", *_settings(level), timeout_ms=TIMEOUT_MS) as a:
                for gbit in args.gbits:
                    proxy.rate = gbit * 1e9 / 8
                    warm = [_store_on_a(a, lm, prompt[WARM_SHIFT * k:], kv[:, :, WARM_SHIFT * k:], CHUNK_TOKENS)
                            for k in range(1, WARM_FETCHES + 1)]
                    ns = _store_on_a(a, lm, prompt, kv, tokens)
                    with replica(cluster, tmp / f"b-{level}-{gbit}", "b", *_settings(level), *via_proxy,
                                 timeout_ms=TIMEOUT_MS) as b:
                        for k, wns in enumerate(warm, 1):   # B's meter learns the link (EWMA)
                            with KVStoreClient(b.addr, wns, token=TOK_X, local=False) as c:
                                c.lookup(prompt[WARM_SHIFT * k:WARM_SHIFT * k + CHUNK_TOKENS])
                        if recompute is None:
                            with KVCacheAdapter(lm.model, KVStoreClient(b.addr, _ns(lm, "miss"), token=TOK_X,
                                                                             local=False), store_back=False) as ad:
                                recompute = [ad.generate(prompt, max_new_tokens=1).ttft_s for _ in range(args.reps)]
                            print(f"recompute on B (adapter, miss): {statistics.median(recompute):.3f}s; plain model "
                                  f"{statistics.median(plain):.3f}s", flush=True)
                        with KVCacheAdapter(lm.model, KVStoreClient(b.addr, ns, token=TOK_X, local=False),
                                            store_back=False) as ad:
                            hit = ad.generate(prompt, max_new_tokens=1)
                        r = stats(b).remote
                        chosen = ", ".join(k.split(":", 1)[1] for k, v in sorted(r.level_decisions.items())
                                           if k.startswith("fetch:") and v)
                        rows.append((level, gbit, hit.ttft_s, hit.retrieve_s, hit.matched_tokens, chosen,
                                     r.throughput_bytes_per_s * 8 / 1e9, r.bytes_read))
                        print(f"{level:>13} {gbit:>3} Gbit/s: ttft {hit.ttft_s:.3f}s (lookup+fill {hit.lookup_s:.3f}s, "
                              f"retrieve {hit.retrieve_s:.3f}s, prefill {hit.prefill_s:.3f}s, "
                              f"{hit.matched_tokens} tokens reused, fetched {chosen}, link measured "
                              f"{r.throughput_bytes_per_s * 8 / 1e9:.2f} Gbit/s, {r.bytes_read / 1e6:.0f} MB)",
                              flush=True)
    _table(rows, statistics.median(recompute), statistics.median(plain), len(prompt), tokens)


def _table(rows, recompute_s: float, plain_s: float, prompt_tokens: int, tokens: int) -> None:
    gbits = sorted({r[1] for r in rows})
    levels = list(dict.fromkeys(r[0] for r in rows))
    ttft = {(r[0], r[1]): r for r in rows}
    print(f"\n## TTFT on replica B, {prompt_tokens}-token prompt, {tokens}-token prefix from the cluster (s)\n")
    print(f"Recompute on B (adapter, miss): {recompute_s:.3f} s; plain model: {plain_s:.3f} s.\n")
    print("| link | " + " | ".join(levels) + " | best fixed | adaptive / best fixed | recompute / adaptive |")
    print("|---|" + "---:|" * (len(levels) + 3))
    for g in gbits:
        cells = [ttft.get((lv, g)) for lv in levels]
        fixed = [c[2] for lv, c in zip(levels, cells) if c is not None and lv != "adaptive"]
        ad = ttft.get(("adaptive", g))
        best = min(fixed) if fixed else None
        line = f"| {g} Gbit/s | " + " | ".join(f"{c[2]:.3f}" if c else "-" for c in cells)
        line += f" | {best:.3f}" if best else " | -"
        line += f" | {ad[2] / best:.2f}" if ad and best else " | -"
        line += f" | {recompute_s / ad[2]:.1f}x |" if ad else " | - |"
        print(line)
    print("\n| link | level | fetched as | link measured (Gbit/s) | MB read | reused tokens | retrieve (s) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[1]} Gbit/s | {r[0]} | {r[5]} | {r[6]:.2f} | {r[7] / 1e6:.0f} | {r[4]} | {r[3]:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix-tokens", type=int, default=4096)
    ap.add_argument("--gbits", type=int, nargs="+", default=[1, 10, 25])
    ap.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    ap.add_argument("--reps", type=int, default=1)
    run(ap.parse_args())


if __name__ == "__main__":
    main()
