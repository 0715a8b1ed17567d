"""Time to first token on replica B: a prefix stored through replica A, fetched by B from the
shared Redis Cluster over a throttled link, against recomputing it on B.

Real parts: a Redis Cluster (3 masters + 3 replicas) behind a throttled link
(``bench/remote_link.py``: a network namespace with ``tc tbf`` on a veth pair when this runs
as root, else the harness's rate-limiting proxy; which one is printed), two ``kvstore
serve`` daemons in the root namespace (both reach Redis only through the link, as replicas
of one fleet would), the transformers adapter with SmolLM2-135M on the CPU.

Per link rate: the achieved ceiling (a raw TCP transfer through the link, and raw redis-py
GETs of 16 x 5 MB through it). Then ``--reps`` rounds, each over every codec setting
(adaptive, or one ``remote.fixed_level``) in turn, so a change of the shared box's load
affects every setting alike; each cell has a fresh A and a fresh B (cold DRAM and disk, own
data dirs):

1. A stores ``WARM_FETCHES`` one-chunk prefixes (its uploads teach its throughput meter the
   link), then the prompt's prefix (``--prefix-tokens``, whole chunks) in its own namespace,
   uploaded at the fixed level or the adaptive choice (plus the small companion).
2. B fetches the one-chunk prefixes (its meter learns the link), then generates one token on
   the prefix: lookup -> remote fetch -> decode -> promote -> retrieve -> prefill of the
   tail. TTFT is the adapter's ``ttft_s``; medians over the rounds are reported.

Recompute on B: the same prompt through the adapter against a B with nothing stored (a miss:
the lookup asks the remote, then the full prefill), and the plain model alone.

Clients use the stream path (``local=False``): one process mapping every fresh B's arena ran
the box out of memory once.

    python bench/remote_ttft.py [--prefix-tokens 4096] [--gbits 1 10 25] [--levels ...] [--reps 3] [--proxy]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from kvstore_client.client import KVStoreClient
from kvstore_client.engines.transformers import KVCacheAdapter, namespace_for, plain_generate
from kvstore_testing import smollm2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from remote.replicas import TOK_X, replica, stats, uploads, wait_uploaded  # noqa: E402
from remote_link import open_link  # noqa: E402

CHUNK_TOKENS = 256
#: One-chunk transfers each fresh replica makes before the measured ones, so its throughput
#: EWMA (alpha 0.2, prior 10 Gbit/s) has converged to the link (0.8^8 = 17% of the prior left).
WARM_FETCHES = 8
WARM_SHIFT = 16
LEVELS = ("adaptive", "lossless", "near-lossless", "default", "aggressive")
#: Remote deadline of the replicas: long enough that a 95 MB prefix at 1 Gbit/s is not cut short.
TIMEOUT_MS = 20_000
#: Budget the adaptive controller plans for (us per token).
BUDGET_US_PER_TOKEN = 50.0
#: Longest wait for a fresh B's one-time codec calibration (seconds of codec work on a loaded box).
CALIBRATION_WAIT_S = 30.0
#: Goals of issue 11.
ADAPTIVE_SLACK = 1.10
HIT_SPEEDUP_AT_10G = 5.0


def _ns(lm, tag: str):
    return namespace_for(lm.model, chunk_tokens=CHUNK_TOKENS,
                         model_id=f"{lm.model_id}#ttft-{tag}-{uuid.uuid4().hex[:8]}")


def _settings(level: str, link) -> list[str]:
    out = [f"remote.load_budget_us_per_token={BUDGET_US_PER_TOKEN}", "remote.min_quality=aggressive",
           "dram.capacity_bytes=1GiB", "disk.capacity_bytes=2GiB", *link.settings]
    if level != "adaptive":
        out += [f'remote.fixed_level="{level}"', "remote.small_companion=false"]
    return out


def _store(a, lm, prompt, kv, tokens: int):
    ns = _ns(lm, "p")
    with KVStoreClient(a.addr, ns, token=TOK_X, local=False) as c:
        n = c.store(prompt[:tokens], kv[:, :, :tokens].contiguous().numpy())
    return ns, n


def _wait_calibrated(daemon) -> None:
    """B's controller measures every level once, in the background, after its first lossless
    fetch (a warm-up): wait for it so it does not share the CPU with a measured run."""
    if not stats(daemon).remote.level_decisions.get("fetch:lossless"):
        return  # only lossy fetches: B keeps its priors and learns from its decodes
    deadline = time.monotonic() + CALIBRATION_WAIT_S
    while time.monotonic() < deadline:
        if "adaptive controller calibrated" in daemon.log_tail(200_000):
            return
        time.sleep(0.2)
    print("  (B's controller did not log its calibration; measuring anyway)", flush=True)


def _cell(link, tmp: Path, lm, prompt, kv, tokens: int, level: str, gbit: int):
    """One measurement: a fresh A stores the prefix, a fresh B (cold) fetches it. Returns B's
    generation result, A's upload decisions and B's remote status."""
    tag = f"{level}-{gbit}-{uuid.uuid4().hex[:6]}"
    with replica(link.cluster, tmp / f"a-{tag}", "a", *_settings(level, link), timeout_ms=TIMEOUT_MS) as a:
        before, n = uploads(a), 0
        warm = []
        for k in range(1, WARM_FETCHES + 1):
            ns, m = _store(a, lm, prompt[WARM_SHIFT * k:], kv[:, :, WARM_SHIFT * k:], CHUNK_TOKENS)
            warm.append(ns)
            n += m
            wait_uploaded(a, n, before)   # one at a time: each upload is one meter sample
        hit, m = _store(a, lm, prompt, kv, tokens)
        wait_uploaded(a, n + m, before)
        up = {k.split(":", 1)[1]: v for k, v in stats(a).remote.level_decisions.items()
              if k.startswith("upload:") and v}
        with replica(link.cluster, tmp / f"b-{tag}", "b", *_settings(level, link), timeout_ms=TIMEOUT_MS) as b:
            for k, wns in enumerate(warm, 1):  # B's meter learns the link
                with KVStoreClient(b.addr, wns, token=TOK_X, local=False) as c:
                    c.lookup(prompt[WARM_SHIFT * k:WARM_SHIFT * k + CHUNK_TOKENS])
            _wait_calibrated(b)
            with KVCacheAdapter(lm.model, KVStoreClient(b.addr, hit, token=TOK_X, local=False),
                                store_back=False) as ad:
                got = ad.generate(prompt, max_new_tokens=1)
            r = stats(b).remote
    print(f"  {level:>13} {gbit:>3} Gbit/s: ttft {got.ttft_s:.3f}s (lookup+fill {got.lookup_s:.3f}, retrieve "
          f"{got.retrieve_s:.3f}, prefill {got.prefill_s:.3f}), {got.matched_tokens} tokens reused, A uploaded "
          f"{up}, B fetched {_fetched(r)}, B's link estimate {r.throughput_bytes_per_s * 8 / 1e9:.2f} Gbit/s",
          flush=True)
    return got, up, r


def _fetched(r) -> dict:
    return {k.split(":", 1)[1]: v for k, v in r.level_decisions.items() if k.startswith("fetch:") and v}


def _row(level: str, gbit: int, cells: list) -> dict:
    """Medians over the reps of one (setting, rate)."""
    runs = [g for g, _, _ in cells]
    med = sorted(runs, key=lambda g: g.ttft_s)[len(runs) // 2]
    up, fetched = {}, {}
    for _, u, r in cells:
        for k, v in u.items():
            up[k] = up.get(k, 0) + v
        for k, v in _fetched(r).items():
            fetched[k] = fetched.get(k, 0) + v
    return dict(level=level, gbit=gbit, ttft=statistics.median(g.ttft_s for g in runs),
                load=statistics.median(g.lookup_s + g.retrieve_s for g in runs),
                lookup=med.lookup_s, retrieve=med.retrieve_s, prefill=med.prefill_s,
                matched=min(g.matched_tokens for g in runs), uploaded=up, fetched=fetched,
                link=statistics.median(r.throughput_bytes_per_s for _, _, r in cells) * 8 / 1e9,
                mb=statistics.median(r.bytes_read for _, _, r in cells) / 1e6)


def run(args) -> None:
    import torch
    torch.set_num_threads(args.torch_threads)
    lm = smollm2.load()
    prompt = smollm2.long_prompt_ids(lm.tokenizer, args.prefix_tokens + 64)
    tokens = args.prefix_tokens // CHUNK_TOKENS * CHUNK_TOKENS
    with torch.inference_mode():  # the prompt's KV, computed once (what A's engine would store)
        out = lm.model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        kv = smollm2.cache_to_kv(out.past_key_values)
    plain = None if args.no_recompute else statistics.median(
        plain_generate(lm.model, prompt, max_new_tokens=1).ttft_s for _ in range(args.reps))
    rows, ceilings = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="kvs-ttft-"))
    with ExitStack() as st:
        link = open_link(st, tmp / "redis", force_proxy=args.proxy)
        link.set_rate(args.gbits[0] * 1e9)
        recompute = None
        if not args.no_recompute:
            with replica(link.cluster, tmp / "miss", "b", *_settings("adaptive", link), timeout_ms=TIMEOUT_MS) as b:
                with KVCacheAdapter(lm.model, KVStoreClient(b.addr, _ns(lm, "miss"), token=TOK_X, local=False),
                                    store_back=False) as ad:
                    recompute = statistics.median(ad.generate(prompt, max_new_tokens=1).ttft_s
                                                  for _ in range(args.reps))
            print(f"recompute on B (adapter, miss): {recompute:.3f}s; plain model {plain:.3f}s", flush=True)
        for gbit in args.gbits:
            link.set_rate(gbit * 1e9)
            raw_tcp = link.ceiling_bits_per_s(gbit * 1e9)
            raw_get = link.raw_get_bits_per_s()
            ceilings[gbit] = (raw_tcp, raw_get)
            print(f"link set to {gbit} Gbit/s: raw TCP {raw_tcp / 1e9:.2f} Gbit/s, raw redis-py GETs "
                  f"{raw_get / 1e9:.2f} Gbit/s", flush=True)
            cells: dict[str, list] = {lv: [] for lv in args.levels}
            for rep in range(args.reps):   # levels interleaved: the box's load drifts over all alike
                print(f" rep {rep + 1}/{args.reps}", flush=True)
                for level in args.levels:
                    cells[level].append(_cell(link, tmp, lm, prompt, kv, tokens, level, gbit))
            rows += [_row(level, gbit, c) for level, c in cells.items()]
    _table(rows, ceilings, recompute, plain, len(prompt), tokens, link.kind, args.reps)


def _table(rows, ceilings, recompute_s: float, plain_s: float, prompt_tokens: int, tokens: int, kind: str,
           reps: int) -> None:
    print(f"\n## TTFT on replica B, {prompt_tokens}-token prompt, {tokens}-token prefix from the cluster "
          f"(s, medians of {reps})\n")
    print(f"Link: {kind}. " + (f"Recompute on B (adapter, miss): {recompute_s:.3f} s; plain model: {plain_s:.3f} s.\n"
                               if recompute_s else "Recompute not measured in this run (--no-recompute).\n"))
    verdicts = _grid(rows, ceilings, "ttft", recompute_s)
    print(f"\nLoad time on B (lookup with the remote fill, then retrieve; the part the level changes; "
          f"s, medians of {reps}):\n")
    verdicts += _grid(rows, ceilings, "load", None)
    print("\n| link set | setting | A uploaded | B fetched | B's link estimate (Gbit/s) | MB read | reused tokens "
          "| lookup+fill (s) | retrieve (s) | prefill (s) |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items()))  # noqa: E731
        print(f"| {r['gbit']} Gbit/s | {r['level']} | {fmt(r['uploaded'])} | {fmt(r['fetched'])} | {r['link']:.2f} "
              f"| {r['mb']:.0f} | {r['matched']} | {r['lookup']:.3f} | {r['retrieve']:.3f} | {r['prefill']:.3f} |")
    print("\n" + "\n".join(f"- {v}" for v in verdicts))


def _grid(rows, ceilings, what: str, recompute_s: float | None) -> list[str]:
    """One table of ``what`` per rate and setting, with the ratios; returns the verdicts."""
    gbits = sorted({r["gbit"] for r in rows})
    levels = list(dict.fromkeys(r["level"] for r in rows))
    at = {(r["level"], r["gbit"]): r[what] for r in rows}
    print("| link set | raw TCP (Gbit/s) | raw redis-py GETs (Gbit/s) | " + " | ".join(levels)
          + " | best fixed | adaptive / best fixed |" + (" recompute / adaptive |" if recompute_s else ""))
    print("|---|---:|---:|" + "---:|" * (len(levels) + 2 + bool(recompute_s)))
    verdicts = []
    for g in gbits:
        fixed = {lv: at[(lv, g)] for lv in levels if lv != "adaptive" and (lv, g) in at}
        ad = at.get(("adaptive", g))
        best = min(fixed.values()) if fixed else None
        line = f"| {g} Gbit/s | {ceilings[g][0] / 1e9:.2f} | {ceilings[g][1] / 1e9:.2f} | "
        line += " | ".join(f"{at[(lv, g)]:.3f}" if (lv, g) in at else "-" for lv in levels)
        line += f" | {best:.3f} ({min(fixed, key=fixed.get)})" if best else " | -"
        line += f" | {ad / best:.2f} |" if ad and best else " | - |"
        if recompute_s:
            line += f" {recompute_s / ad:.1f}x |" if ad else " - |"
        print(line)
        if ad and best:
            verdicts.append(f"{what} at {g} Gbit/s: adaptive / best fixed = {ad / best:.2f} "
                            f"({'met' if ad <= ADAPTIVE_SLACK * best else 'NOT met'}, goal <= {ADAPTIVE_SLACK})")
        if ad and recompute_s and g == 10:
            s = recompute_s / ad
            verdicts.append(f"{what} at 10 Gbit/s: recompute / hit = {s:.1f}x "
                            f"({'met' if s >= HIT_SPEEDUP_AT_10G else 'NOT met'}, goal >= {HIT_SPEEDUP_AT_10G}x)")
    return verdicts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix-tokens", type=int, default=4096)
    ap.add_argument("--gbits", type=int, nargs="+", default=[1, 10, 25])
    ap.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-recompute", action="store_true",
                    help="skip the recompute baseline (measured in another run)")
    ap.add_argument("--proxy", action="store_true", help="use the harness's proxy even where tc works")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="intra-op threads of the model (1: on a shared box two OpenMP threads stall on "
                         "each other at every barrier)")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
