"""Quality of the KV codec levels on SmolLM2-135M-Instruct, beside baselines, in one run.

For each text: 1024 context tokens are prefilled (exact KV, float32), the KV is replaced by
its round trip through a method (each 256-token chunk encoded on its own, from fp16), and
the next 256 tokens are scored teacher-forced against the exact KV: KL(exact || method) of
the next-token distributions (primary), top-1 agreement, perplexity change. Bits per KV
element are split into payload and metadata (tables, scales, lane headers, container).

    HF_HUB_OFFLINE=1 python bench/codec_quality.py [--texts 3] [--sweep]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kv_baselines  # noqa: E402

import kvstore_native.codec as kc  # noqa: E402
from kvstore_testing import smollm2  # noqa: E402

CONTEXT_TOKENS = 1024
CONTINUATION_TOKENS = 256
CHUNK_TOKENS = 256
CACHE_DIR = Path(os.environ.get("KVSTORE_BENCH_CACHE", "/tmp/kvstore_quality_cache"))


def exact_case(name: str, text: str) -> dict:
    """Exact KV + continuation logits of one text, cached on disk (keyed by the text)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{name}|{CONTEXT_TOKENS}|{CONTINUATION_TOKENS}|{text}".encode()).hexdigest()[:16]
    path = CACHE_DIR / f"{key}.npz"
    if path.exists():
        z = np.load(path)
        return {k: z[k] for k in z.files}
    ids = smollm2.token_ids(text, CONTEXT_TOKENS + CONTINUATION_TOKENS, offset_tokens=64)
    kv, _ = smollm2.compute_kv(ids[:CONTEXT_TOKENS])
    cont = ids[CONTEXT_TOKENS:]
    logits = smollm2.continuation_logits(kv, cont)
    np.savez(path, kv=kv, cont=cont, logits=logits)
    return {"kv": kv, "cont": cont, "logits": logits}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def metrics(ref_logits: np.ndarray, logits: np.ndarray, cont: np.ndarray) -> tuple[float, float, float]:
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    kl = float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())
    top1 = float((lp.argmax(-1) == lq.argmax(-1)).mean())
    tgt = cont[1:]
    nll_ref = -lp[np.arange(len(tgt)), tgt].mean()
    nll = -lq[np.arange(len(tgt)), tgt].mean()
    return kl, top1, float(np.exp(nll - nll_ref) - 1.0)


def chunked(kv: np.ndarray, fn):
    """Apply a chunk method to every 256-token chunk; returns (kv_hat, payload_bits, meta_bits)."""
    parts, pay, meta = [], 0.0, 0.0
    for t0 in range(0, kv.shape[2], CHUNK_TOKENS):
        r = fn(np.ascontiguousarray(kv[:, :, t0:t0 + CHUNK_TOKENS]))
        parts.append(r.kv)
        pay += r.payload_bits
        meta += r.meta_bits
    return np.concatenate(parts, axis=2), pay, meta


def codec_method(level: kc.CodecLevel, policy=None):
    def run(kv: np.ndarray) -> kv_baselines.Result:
        x = kv.astype(np.float16)
        b = kc.encode(x, level, policy=policy)
        y = kc.decode(b).astype(np.float32)
        br = kc.size_breakdown(b)
        meta = br["container"] + br["channel_tables"] + br["lane_tables"]
        payload = len(b) - meta
        return kv_baselines.Result(y, 8.0 * payload, 8.0 * meta)
    return run


def evaluate(methods: dict, cases: list[dict]) -> list[tuple]:
    rows = []
    for name, fn in methods.items():
        kls, top1s, ppls, pays, metas, n = [], [], [], [], [], 0
        for case in cases:
            kv_hat, pay, meta = chunked(case["kv"], fn)
            logits = smollm2.continuation_logits(kv_hat, case["cont"])
            kl, top1, dppl = metrics(case["logits"], logits, case["cont"])
            kls.append(kl); top1s.append(top1); ppls.append(dppl)
            pays.append(pay); metas.append(meta); n += case["kv"].size
        bits_p, bits_m = sum(pays) / n, sum(metas) / n
        rows.append((name, bits_p + bits_m, bits_p, bits_m, 16.0 / (bits_p + bits_m),
                     float(np.mean(kls)), float(np.mean(top1s)), float(np.mean(ppls))))
        print(f"  {name:28s} {bits_p + bits_m:6.3f} b/elem  KL {np.mean(kls):.4f}", flush=True)
    return rows


def print_table(rows):
    print("\n| method | bits/elem | payload | metadata | ratio vs fp16 | KL (mean) | top-1 agree | ppl change |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.2f}x | {r[5]:.4f} | {r[6] * 100:.1f}% | {r[7] * 100:+.2f}% |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="sweep encoder policies (tuning)")
    args = ap.parse_args()
    t0 = time.time()
    all_texts = smollm2.texts()
    picks = [all_texts[i] for i in (0, 1, len(all_texts) - 1, 2, 3)[: args.texts]]
    cases = [exact_case(n, t) for n, t in picks]
    print(f"texts: {[n for n, _ in picks]}; context {CONTEXT_TOKENS}, continuation {CONTINUATION_TOKENS}, "
          f"chunks of {CHUNK_TOKENS} tokens (exact KV ready after {time.time() - t0:.0f} s)")
    methods: dict = {}
    if args.sweep:
        for spec in os.environ.get("SWEEP", "").split(";"):
            pol = tuple(int(v) for v in spec.split(","))
            methods[f"policy {pol}"] = codec_method(kc.CodecLevel.DEFAULT, pol)
    else:
        for name, fn in kv_baselines.BASELINES.items():
            methods[name] = fn
        for lvl in (kc.CodecLevel.LOSSLESS, kc.CodecLevel.NEAR_LOSSLESS, kc.CodecLevel.DEFAULT,
                    kc.CodecLevel.AGGRESSIVE):
            methods[f"kvstore {lvl.name.lower()}"] = codec_method(lvl)
    rows = evaluate(methods, cases)
    print_table(rows)
    print(f"\n(total {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
