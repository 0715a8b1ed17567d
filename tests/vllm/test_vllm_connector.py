"""The kvstore connector in real vLLM-CPU engines, against real daemons (issue 10).

One scenario shared by the tests of this module (engine starts cost 30-40 s each, so three
engines serve every test, in this order):

- engine C (model identity "other") starts while the sidecar is DOWN: its requests complete
  as misses and give the cold reference outputs; then the daemon starts, C reconnects,
  stores, and hits its own chunks;
- engine A (the real namespace) misses although the daemon holds C's chunks of the same
  prompts (namespaces never share), stores the long prompt, and a prompt sharing its first
  1024 tokens with a different suffix hits those 4 chunks;
- engine B (a second process, same namespace as A) hits both prompts from DRAM, then from
  disk after a daemon restart; a chunk evicted between lookup and load, and a daemon killed
  (SIGKILL) with its shared index left behind, are recomputed; a lossy disk codec keeps most
  greedy tokens.

Every output is compared token for token with engine C's cold output of the same prompt.
"""

from __future__ import annotations

import signal
import time

import pytest

import vllm_harness as H
from kvstore_testing.daemon import DaemonProcess
from kvstore_testing.ports import free_port

ROOT = H.suite_conftest()

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

CHUNK = 128                        #: the connector's default on the CPU backend (one vLLM block)
LONG_TOKENS = 1492                 #: the issue's prompt length: 11 whole chunks + 84 tokens
#: What a hit of a prompt seen before loads: all but its last token (11 whole chunks and the
#: trailing partial chunk of 83 tokens; vLLM computes the last token's logits).
LONG_REUSABLE = LONG_TOKENS - 1
SHARED_TOKENS = 1024               #: shared prefix of the second prompt (8 chunks)
MAX_TOKENS = 16
#: near-lossless codec on the disk tier: at least this share of greedy tokens equal to the
#: lossless run (docs/vllm.md states the bound and the measured value).
LOSSY_MIN_EQUAL_FRACTION = 0.75
OTHER_ID = "smollm2-other-identity"
#: Longer than the engines' kvstore.reconnect_s (1 s, vllm_harness.connector_config).
RECONNECT_WAIT_S = 1.5


class Scenario:
    def __init__(self, tmp, model, texts):
        self.tmp, self.model = tmp, model
        gpl, apache, mpl = texts["GPL-3"], texts["Apache-2.0"], texts["MPL-2.0"]
        self.long = gpl[:LONG_TOKENS]
        self.shared = gpl[:SHARED_TOKENS] + apache[:400]
        self.other = mpl[:1100]
        port = free_port()
        settings = [s for s in ROOT.SMALL if not s.startswith(("dram.capacity", "disk.capacity"))]
        self.daemon = DaemonProcess(tmp / "data", f"127.0.0.1:{port}", tmp / "daemon.log",
                                    settings + ["dram.capacity_bytes=768MiB", "disk.capacity_bytes=2GiB"],
                                    # restarts happen beside live vLLM engines on a 2-core box
                                    start_timeout_s=90.0)
        self.engines: dict[str, H.Engine] = {}
        self.ref: dict[str, dict] = {}

    def engine(self, name: str, **extra) -> H.Engine:
        if name not in self.engines:
            cfg = H.connector_config(self.daemon.addr, **extra)
            self.engines[name] = H.Engine(self.model, cfg, self.tmp / f"engine-{name}.log")
        return self.engines[name]

    def close(self):
        for e in self.engines.values():
            e.close()
        if self.daemon.proc is not None:
            self.daemon.stop()


@pytest.fixture(scope="module")
def sc(tmp_path_factory, hf_model, texts):
    s = Scenario(tmp_path_factory.mktemp("vllm"), hf_model, texts)
    yield s
    s.close()


def _wait_stored(sc, tokens, model_id: str | None = None, timeout_s: float = 60.0) -> None:
    """Until the daemon has every chunk a hit of the prompt ``tokens`` loads (its whole chunks
    and the trailing partial one of all but its last token) in the engines' namespace (the
    connector stores on a background thread, after the request has returned)."""
    from kvstore_client import KVStoreClient, Namespace, Tier
    from kvstore_client.engines.vllm.namespace import checkpoint_digest

    ns = Namespace(model=model_id or f"{sc.model.name}@sha256:{checkpoint_digest(sc.model)[:32]}",
                   dtype="float32", num_layers=30, num_kv_heads=3, head_dim=64, chunk_tokens=CHUNK)
    deadline = time.monotonic() + timeout_s
    with KVStoreClient(sc.daemon.addr, ns, local=False) as c:
        keys = c.keys(tokens[:-1], include_partial=True)
        while Tier.NONE in c.exists(keys):
            assert time.monotonic() < deadline, "the connector did not store the prompt's chunks"
            time.sleep(0.1)


def _one(engine: H.Engine, prompt, **kw) -> dict:
    return engine.generate([prompt], max_tokens=MAX_TOKENS, **kw)[0]


def _loaded(r: dict) -> int:
    return (r.get("kv_transfer_params") or {}).get("kvstore.loaded_tokens", 0)


def test_sidecar_down_at_start_gives_correct_output_then_reconnects(sc):
    c = sc.engine("C", model_id=OTHER_ID)       # the daemon is not running yet
    for name in ("long", "shared", "other"):
        r = _one(c, getattr(sc, name))
        assert r["num_cached_tokens"] == 0 and _loaded(r) == 0
        assert len(r["tokens"]) == MAX_TOKENS
        sc.ref[name] = r
    sc.daemon.start()
    time.sleep(RECONNECT_WAIT_S)
    first = _one(c, sc.long)                         # reconnects; a miss; stores
    assert first["tokens"] == sc.ref["long"]["tokens"]
    assert _loaded(first) == 0
    _wait_stored(sc, sc.long, OTHER_ID)
    again = _one(c, sc.long)                         # its own chunks, from the daemon
    assert _loaded(again) == LONG_REUSABLE
    assert again["num_cached_tokens"] == LONG_REUSABLE
    assert again["tokens"] == sc.ref["long"]["tokens"]


def test_other_namespace_never_shares_then_shared_prefix_hits(sc):
    a = sc.engine("A")
    r = _one(a, sc.long)                # the daemon holds C's chunks of this prompt: not ours
    assert _loaded(r) == 0 and r["num_cached_tokens"] == 0
    assert r["tokens"] == sc.ref["long"]["tokens"]
    _wait_stored(sc, sc.long)
    s = _one(a, sc.shared)              # same first 1024 tokens, another suffix: not the long tail
    assert _loaded(s) == SHARED_TOKENS
    assert s["tokens"] == sc.ref["shared"]["tokens"]
    _wait_stored(sc, sc.shared)


def test_second_engine_hits_from_dram_lossless_and_faster(sc):
    b = sc.engine("B", fault_injection=True)
    r = _one(b, sc.long)
    assert r["num_cached_tokens"] == LONG_REUSABLE and _loaded(r) == LONG_REUSABLE
    assert r["tokens"] == sc.ref["long"]["tokens"]
    assert r["ttft_s"] < sc.ref["long"]["ttft_s"], (r["ttft_s"], sc.ref["long"]["ttft_s"])
    s = _one(b, sc.shared)              # A stored the rest of it: all but its last token hit
    assert _loaded(s) == len(sc.shared) - 1
    assert s["tokens"] == sc.ref["shared"]["tokens"]


def test_daemon_restart_hits_from_disk(sc):
    b = sc.engine("B", fault_injection=True)
    sc.daemon.restart()                 # SIGTERM: DRAM is gone, the disk tier stays
    time.sleep(RECONNECT_WAIT_S)
    r = _one(b, sc.long)
    if _loaded(r) == 0:                 # the first call after a restart may find the link down
        r = _one(b, sc.long)
    assert _loaded(r) == LONG_REUSABLE
    assert r["tokens"] == sc.ref["long"]["tokens"]


def test_chunk_evicted_between_lookup_and_load_is_recomputed(sc):
    b = sc.engine("B", fault_injection=True)
    r = _one(b, sc.long, kv_params={"kvstore.fault": "evict_after_lookup"})
    assert _loaded(r) == LONG_REUSABLE      # planned; only chunk 0 arrived
    assert r["tokens"] == sc.ref["long"]["tokens"]
    assert "did not load" in b.log_tail(200_000)


def test_sidecar_killed_between_lookup_and_load_still_correct(sc):
    b = sc.engine("B", fault_injection=True)
    sc.daemon.kill(signal.SIGKILL)      # its shared presence index and arena files stay behind
    r = _one(b, sc.long)                # a stale "hit" whose load fails, or a miss: either way correct
    assert r["tokens"] == sc.ref["long"]["tokens"]
    if _loaded(r):                      # the lookup answered from the stale index: the load failed
        assert b.log_tail(200_000).count("did not load") >= 2
    print(f"sidecar killed: {'stale hit, load failed, recomputed' if _loaded(r) else 'miss'}")
    sc.daemon.start()


def test_lossy_disk_tier_within_documented_bound(sc):
    b = sc.engine("B", fault_injection=True)
    sc.daemon.stop()
    sc.daemon.settings.append('disk.codec="near-lossless"')
    sc.daemon.start()
    time.sleep(RECONNECT_WAIT_S)
    cold = _one(b, sc.other)            # stored; the disk tier encodes it near-lossless
    assert cold["tokens"] == sc.ref["other"]["tokens"]
    _wait_stored(sc, sc.other)
    sc.daemon.restart()                 # SIGTERM drains the disk writer before exiting
    time.sleep(RECONNECT_WAIT_S)
    r = _one(b, sc.other)
    if _loaded(r) == 0:
        r = _one(b, sc.other)
    assert _loaded(r) == len(sc.other) - 1      # planned; the lossy partial chunk is recomputed
    assert "came from a lossy tier" in b.log_tail(200_000)
    ref = sc.ref["other"]["tokens"]
    equal = sum(x == y for x, y in zip(r["tokens"], ref)) / len(ref)
    print(f"lossy disk tier: {equal:.2%} of greedy tokens equal to the lossless run")
    assert equal >= LOSSY_MIN_EQUAL_FRACTION
