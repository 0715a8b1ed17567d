"""TTFT on vLLM-CPU (SmolLM2-135M, fp32) against cached-prefix length, kvstore vs the peers.

    python bench/vllm_ttft.py                          # lengths 512,1024,2048,4096; 3 prompts each
    python bench/vllm_ttft.py --lengths 1492 --prompts 3 --threads 2
    python bench/vllm_ttft.py --modes kv,file --out r.jsonl   # a part; --table r.jsonl prints them all
    python bench/vllm_ttft.py --modes lmcache                 # needs --lmcache-python (its own venv)

Runs from the project's environment (the daemon's); the engines run in ``.venv-vllm``
(created when missing, tests/vllm/setup_env.sh). Same prompts for every configuration, one
request at a time, TTFT = vLLM's own first-token latency (arrival -> first token):

- ``cold``:      vLLM without a connector;
- ``kv miss``:   vLLM + kvstore on an empty daemon (lookup misses, the prompt's chunks are saved);
- ``kv dram``:   a second vLLM process + kvstore: the prefix comes from the daemon's DRAM;
- ``kv disk``:   the daemon restarted (DRAM empty), same process: the prefix comes from disk;
- ``kv whole``:  (``--modes kvwhole``, after ``kv``) a third process with
                 ``kvstore.partial_chunks=false``: a hit loads whole chunks only and vLLM
                 recomputes the rest of the prompt (how the connector worked before);
- ``file``:      vLLM's built-in ExampleConnector (safetensors per layer), a fresh process
                 loading what a first process saved (it only matches a whole identical prompt);
- ``kv shared``: prompts sharing a ``--shared`` token prefix with different suffixes (kvstore
                 loads the shared chunks; the file connector cannot match them at all);
- ``lmcache mem`` / ``lmcache restart``: LMCache's multi-process server (its own venv,
                 ``--lmcache-python``) with vLLM's ``LMCacheMPConnector``: a fresh engine
                 hitting its memory tier, then a fresh engine after the server restarted (its
                 fs L2 only).

Also (``--modes miss``): the miss overhead, a cold engine and a kvstore engine alive side by
side running the same fresh prompts interleaved (cold, kv, cold, kv, ...: each a true miss),
medians, plus the connector's own lookup time; and (``bandwidth``) the load bandwidth into
paged blocks against a plain memcpy of the same bytes. Prints medians and ratios; ``--out``
appends every result as a JSON line so parts run at different times make one table. Not
part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
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


MODES = ("cold", "kv", "kvwhole", "file", "lmcache", "miss", "bandwidth")
LMCACHE_ENV = {"DO_NOT_TRACK": "1", "LMCACHE_TRACK_USAGE": "false"}
#: Seconds the LMCache server gets to start (imports torch and its CUDA-less fallbacks).
LMCACHE_START_TIMEOUT_S = 120.0


def _take(pool: list[int], start: int, n: int) -> list[int]:
    """``n`` tokens of the text pool from ``start``, wrapping around: prompts starting at
    different offsets share no leading chunk, so no prompt is a prefix hit for another."""
    return [pool[(start + i) % len(pool)] for i in range(n)]


class LMCacheServer:
    """LMCache 0.5.6's multi-process server (the issue's command line), restartable."""

    def __init__(self, python: Path, tmp: Path) -> None:
        self.python, self.tmp = python, tmp
        self.port, self.http_port = free_port(), free_port()
        self.l2 = tmp / "lmcache-l2"
        self.l2.mkdir(exist_ok=True)
        self.shm = f"kvs_bench_lmc_{os.getpid()}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LMCacheServer":
        cmd = [str(self.python), "-m", "lmcache.v1.multiprocess.http_server", "--host", "localhost", "--port",
               str(self.port), "--http-port", str(self.http_port), "--l1-size-gb", "2", "--eviction-policy", "LRU",
               "--chunk-size", "256", "--supported-transfer-mode", "auto", "--shm-name", self.shm,
               "--l2-adapter", json.dumps({"type": "fs", "base_path": str(self.l2)})]
        log = open(self.tmp / "lmcache-server.log", "ab")
        env = {**os.environ, **LMCACHE_ENV}
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        import urllib.request

        deadline = time.monotonic() + LMCACHE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"LMCache server exited {self.proc.returncode}; see {self.tmp / 'lmcache-server.log'}")
            try:
                urllib.request.urlopen(f"http://localhost:{self.http_port}/", timeout=1)
                return self
            except OSError as e:
                if getattr(e, "code", None):          # an HTTP error status: the server answers
                    return self
                time.sleep(0.5)
        raise RuntimeError("LMCache server did not answer on its HTTP port")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def connector_config(self) -> dict:
        return {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"lmcache.mp.host": "tcp://localhost", "lmcache.mp.port": self.port}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,1024,2048,4096", help="cached-prefix lengths (tokens)")
    ap.add_argument("--tail", type=int, default=212, help="uncached tokens after the prefix")
    ap.add_argument("--prompts", type=int, default=3, help="prompts per length (medians)")
    ap.add_argument("--shared", type=int, default=1024, help="shared-prefix length for the suffix case")
    ap.add_argument("--threads", type=int, default=2, help="OpenMP threads per engine")
    ap.add_argument("--modes", default="cold,kv,file,miss,bandwidth", help=f"comma list of {','.join(MODES)}")
    ap.add_argument("--miss-length", type=int, default=1024, help="prefix length of the miss-overhead prompts")
    ap.add_argument("--miss-prompts", type=int, default=5, help="interleaved prompt pairs for the miss overhead")
    ap.add_argument("--lmcache-python", type=Path, default=Path("/tmp/lmc-venv/bin/python"),
                    help="interpreter of a venv with vLLM and lmcache==0.5.6 (LMCache's server and engine)")
    ap.add_argument("--out", type=Path, help="append results here (JSON lines)")
    ap.add_argument("--table", type=Path, help="only print the table of the results in this file")
    args = ap.parse_args()
    if args.table:
        _table([json.loads(line) for line in args.table.read_text().splitlines() if line.strip()])
        return
    modes = set(args.modes.split(","))
    if modes - set(MODES):
        ap.error(f"unknown modes {sorted(modes - set(MODES))}")
    H.VLLM_ENV.update({"VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}" if args.threads > 1 else "0",
                       "OMP_NUM_THREADS": str(args.threads)})
    lengths = [int(x) for x in args.lengths.split(",")]
    model = H.model_dir()
    text = H.tokenize_texts(model)
    pool = [t for name in sorted(text) for t in text[name]]
    step = 997                            # prompt start offsets: distinct first chunks
    prompts = {L: [_take(pool, (k * len(lengths) + j) * step, L + args.tail) for k in range(args.prompts)]
               for j, L in enumerate(lengths)}
    base = _take(pool, 101, args.shared)
    shared = [base + _take(pool, 5000 + i * 1301, 300) for i in range(args.prompts + 1)]
    miss = [_take(pool, 333 + i * 1709, args.miss_length + args.tail) for i in range(args.miss_prompts)]
    load = os.getloadavg()[0]
    out_rows: list[dict] = []

    def record(name: str, values: dict, **extra) -> None:
        row = {"name": name, "values": {str(k): v for k, v in values.items()}, "load1": round(load, 1),
               "threads": args.threads, "prompts": args.prompts, "tail": args.tail, **extra}
        out_rows.append(row)
        print(f"{name}: " + ", ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}"
                                      for k, v in values.items()), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the finally: engines and daemon go too
    tmp = Path(tempfile.mkdtemp(prefix="kvstore-vllm-bench-"))
    daemon = DaemonProcess(tmp / "data", f"127.0.0.1:{free_port()}", tmp / "daemon.log",
                           ['metrics.listen=""', "dram.capacity_bytes=3GiB", "disk.capacity_bytes=8GiB",
                            "server.shutdown_grace_s=1"]).start()
    live: list[H.Engine] = []
    lmc: LMCacheServer | None = None

    def engine(cfg, log, **kw):
        live.append(H.Engine(model, cfg, tmp / log, **kw))
        return live[-1]

    def close(e):
        e.close()
        live.remove(e)

    def run(name, e, only=None, **extra):
        use = [L for L in lengths if only is None or only(L)]
        got = _ttfts(e, [p for L in use for p in prompts[L]])
        it = iter(got)
        record(name, {L: _med([next(it) for _ in prompts[L]]) for L in use}, **extra)
        return got

    kv_cfg = H.connector_config(daemon.addr, durability="persisted")
    try:
        if "cold" in modes:
            e = engine(None, "cold.log")
            run("cold", e)
            record("cold shared", {args.shared: _med(_ttfts(e, shared[1:]))})
            close(e)
        if "miss" in modes:
            # Same fresh prompts through both engines, interleaved: each kvstore run is a miss.
            cold, kv = engine(None, "miss-cold.log"), engine(kv_cfg, "miss-kv.log")
            _ttfts(cold, [_take(pool, 7, 300)]), _ttfts(kv, [_take(pool, 7, 300)])   # warm both
            c_t, k_t, lookups = [], [], []
            for p in miss:
                c_t.append(cold.generate([p], max_tokens=2)[0]["ttft_s"])
                r = kv.generate([p], max_tokens=2)[0]
                k_t.append(r["ttft_s"])
                lookups.append((r.get("kv_transfer_params") or {}).get("kvstore.lookup_ms", float("nan")))
            cm, km = statistics.median(c_t), statistics.median(k_t)
            record("miss overhead", {"cold_s": cm, "kv_miss_s": km, "ratio": km / cm - 1,
                                     "lookup_ms": statistics.median(lookups)},
                   pairs=[[a, b] for a, b in zip(c_t, k_t)], length=args.miss_length)
            close(cold), close(kv)
        if "kv" in modes:
            e = engine(kv_cfg, "kv1.log")
            run("kv miss", e)
            _ttfts(e, shared[:1])            # publishes the shared prefix
            close(e)
            e = engine(kv_cfg, "kv2.log")
            got = run("kv dram", e)
            # Where a hit's time goes: the connector's load (its log line) and lookup, per length.
            loads = [float(m) for m in re.findall(r"loaded \d+ tokens into \d+ blocks in ([0-9.]+) ms",
                                                  (tmp / "kv2.log").read_text(errors="replace"))]
            pairs, prof = list(zip(got, loads)), {}
            for j, L in enumerate(lengths):           # the first prompt of each length
                if j * args.prompts < len(pairs):
                    r, ld = pairs[j * args.prompts]
                    lk = (r.get("kv_transfer_params") or {}).get("kvstore.lookup_ms", float("nan"))
                    prof[L] = (f"ttft {r['ttft_s'] * 1e3:.0f} ms, load {ld:.1f} ms, lookup {lk:.2f} ms, "
                               f"{r['num_cached_tokens']} of {len(prompts[L][0])} tokens loaded")
            record("kv dram profile", prof)
            got_shared = _ttfts(e, shared[1:])
            record("kv shared", {args.shared: _med(got_shared)}, each=[[round(r["ttft_s"], 3), r["num_cached_tokens"]]
                                                                       for r in got_shared])
            daemon.restart()
            time.sleep(1.5)
            _ttfts(e, [_take(pool, 17, 600)])  # reconnects after the restart (a miss)
            run("kv disk", e)
            close(e)
            if "kvwhole" in modes:           # the same stored chunks, whole ones only
                e = engine(H.connector_config(daemon.addr, durability="persisted", partial_chunks=False), "kv3.log")
                run("kv whole", e)
                close(e)
        if "file" in modes:
            store = tmp / "file-connector"
            store.mkdir()
            file_cfg = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                        "kv_connector_extra_config": {"shared_storage_path": str(store)}}
            # The example connector saves what the first scheduler step computed only: prompts
            # longer than one step (max_num_batched_tokens, 4096 on vLLM-CPU) crash its loader.
            fits = lambda L: L + args.tail <= FILE_CONNECTOR_MAX_TOKENS  # noqa: E731
            e = engine(file_cfg, "file1.log")
            _ttfts(e, [p for L in lengths if fits(L) for p in prompts[L]])
            close(e)
            e = engine(file_cfg, "file2.log")
            run("file", e, only=fits)
            close(e)
        if "lmcache" in modes:
            lmc = LMCacheServer(args.lmcache_python, tmp).start()
            kw = dict(python=args.lmcache_python, extra_env=LMCACHE_ENV)
            e = engine(lmc.connector_config(), "lmc1.log", **kw)
            run("lmcache miss", e)
            _ttfts(e, shared[:1])
            close(e)
            e = engine(lmc.connector_config(), "lmc2.log", **kw)
            run("lmcache mem", e)
            got_shared = _ttfts(e, shared[1:])
            record("lmcache shared", {args.shared: _med(got_shared)},
                   each=[[round(r["ttft_s"], 3), r["num_cached_tokens"]] for r in got_shared])
            close(e)
            lmc.stop()
            lmc.start()
            e = engine(lmc.connector_config(), "lmc3.log", **kw)
            run("lmcache restart", e)
            close(e)
        if "bandwidth" in modes:
            bw = load_bandwidth(daemon.addr, _take(pool, 0, 4096))
            _print_bandwidth(bw)
            record("bandwidth", {k: v for k, v in bw.items()})
    finally:
        for e in list(live):
            e.close()
        if lmc is not None:
            lmc.stop()
        daemon.stop()
    _table(out_rows)
    shutil.rmtree(tmp, ignore_errors=True)


def _table(rows: list[dict]) -> None:
    """The TTFT table of whatever ``rows`` hold (later rows of one name win)."""
    res = {r["name"]: {int(k) if k.isdigit() else k: v for k, v in r["values"].items()} for r in rows}
    loads = sorted({r["load1"] for r in rows})
    cols = [c for c in ("cold", "kv miss", "kv dram", "kv disk", "kv whole", "file", "lmcache mem", "lmcache restart")
            if c in res]
    lengths = sorted({L for c in cols for L in res[c] if isinstance(L, int)})
    if cols:
        print(f"\nTTFT medians, seconds (1-min load average at the starts: {loads})")
        ratios = [(a, b) for a, b in (("cold", "kv dram"), ("kv whole", "kv dram"), ("file", "kv dram"),
                                      ("lmcache mem", "kv dram"), ("lmcache restart", "kv disk"))
                  if a in res and b in res]
        print("| cached prefix | " + " | ".join(cols) + "".join(f" | {a} / {b}" for a, b in ratios) + " |")
        print("|---" * (len(cols) + len(ratios) + 1) + "|")
        for L in lengths:
            cell = lambda c: f"{res[c][L]:.3f}" if L in res[c] else "n/a"  # noqa: E731
            rat = lambda a, b: f"{res[a][L] / res[b][L]:.2f}x" if L in res[a] and L in res[b] else "-"  # noqa: E731
            print(f"| {L} | " + " | ".join(cell(c) for c in cols) + "".join(f" | {rat(a, b)}" for a, b in ratios) + " |")
    if "kv dram profile" in res:
        print("kvstore DRAM hits: " + "; ".join(f"{k}: {v}" for k, v in res["kv dram profile"].items()))
    for name in ("cold shared", "kv shared", "lmcache shared"):
        if name in res:
            print(f"{name} ({', '.join(f'{k}-token prefix: {v:.3f} s' for k, v in res[name].items())})")
    if "miss overhead" in res:
        m = res["miss overhead"]
        print(f"miss overhead: kv miss {m['kv_miss_s']:.3f} s vs cold {m['cold_s']:.3f} s = {m['ratio']:+.2%} "
              f"(medians, interleaved); the connector's lookup {m['lookup_ms']:.2f} ms = "
              f"{m['lookup_ms'] / 1e3 / m['cold_s']:.3%} of TTFT")
    if "bandwidth" in res:
        _print_bandwidth(res["bandwidth"])


if __name__ == "__main__":
    main()
