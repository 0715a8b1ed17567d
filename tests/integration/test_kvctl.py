"""kvctl against a real daemon (subprocess, --json) and with the daemon down."""

from __future__ import annotations

import json
import subprocess
import sys

from kvstore_client import KVStoreClient

from .helpers import kv_for, smol_ns, tokens_for


def kvctl(addr, *args, token=None, json_flag=True):
    cmd = [sys.executable, "-m", "kvstore.cli.kvctl", "--addr", addr, *(["--json"] if json_flag else []), *args]
    if token:
        cmd[3:3] = ["--token", token]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _ok(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _store(daemon, name, n_tokens=512, seed=11):
    ns = smol_ns(name, num_layers=2)
    toks = tokens_for(n_tokens, seed=seed)
    with KVStoreClient(daemon.addr, ns) as c:
        c.store(toks, kv_for(ns, n_tokens))
        return ns, c.namespace_id.hex(), [k.hex() for k in c.keys(toks)]


def test_kvctl_commands(daemon):
    ns, nid, keys = _store(daemon, "kvctl")
    assert _ok(kvctl(daemon.addr, "status"))["health"] == "serving"
    stats = _ok(kvctl(daemon.addr, "stats"))
    assert {t["tier"] for t in stats["tiers"]} >= {"dram"}
    assert nid in [n["namespace_id"] for n in _ok(kvctl(daemon.addr, "namespaces"))["namespaces"]]
    listed = _ok(kvctl(daemon.addr, "ls", "--namespace", nid, "--limit", "1", "--all"))["keys"]
    assert sorted(e["key"] for e in listed) == sorted(keys)
    info = _ok(kvctl(daemon.addr, "inspect", nid, keys[0]))["entry"]
    assert info["num_tokens"] == 256 and info["payload_bytes"] == ns.chunk_bytes()
    assert _ok(kvctl(daemon.addr, "pin", nid, keys[0], "--ttl", "60"))["pinned"] == 1
    assert _ok(kvctl(daemon.addr, "inspect", nid, keys[0]))["entry"]["pinned"] is True
    assert _ok(kvctl(daemon.addr, "unpin", nid, keys[0]))["unpinned"] == 1
    assert _ok(kvctl(daemon.addr, "evict", "--namespace", nid, keys[1]))["evicted"] >= 1
    assert _ok(kvctl(daemon.addr, "clear", "--namespace", nid))["deleted"] >= 1
    r = kvctl(daemon.addr, "ls", "--namespace", nid)
    assert r.returncode == 1 and json.loads(r.stdout)["keys"] == []       # nothing matched
    r = kvctl(daemon.addr, "inspect", nid, keys[0])
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "Traceback" not in r.stderr
    # human output works too
    r = kvctl(daemon.addr, "stats", json_flag=False)
    assert r.returncode == 0 and "evictions" in r.stdout


def _types_ok(obj, path="$"):
    """Typed numbers (never numeric strings), lower-case enum names, hex ids."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _types_ok(v, f"{path}.{k}")
            if k in ("tier", "dtype", "encoding", "key_kind", "layout", "health") and v is not None:
                assert isinstance(v, str) and v == v.lower(), (path, k, v)
            if k == "tiers" and v and isinstance(v[0], str):
                assert all(t == t.lower() for t in v), (path, v)
            if k in ("namespace_id", "key"):
                assert isinstance(v, str) and len(v) == 64 and int(v, 16) >= 0, (path, k, v)
            if k.endswith(("_bytes", "chunks", "hits", "misses", "evictions", "corrupt", "num_tokens",
                           "namespaces", "depth", "dropped", "checked", "total")) and not isinstance(v, list):
                assert isinstance(v, int) and not isinstance(v, bool), (path, k, v)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _types_ok(v, f"{path}[{i}]")


def test_kvctl_json_schema_across_commands(daemon):
    _, nid, keys = _store(daemon, "kvctl-schema", seed=12)
    outputs = {
        "status": _ok(kvctl(daemon.addr, "status")), "stats": _ok(kvctl(daemon.addr, "stats")),
        "namespaces": _ok(kvctl(daemon.addr, "namespaces")), "ls": _ok(kvctl(daemon.addr, "ls", "--all")),
        "inspect": _ok(kvctl(daemon.addr, "inspect", nid, keys[0])),
        "pin": _ok(kvctl(daemon.addr, "pin", nid, keys[0])), "unpin": _ok(kvctl(daemon.addr, "unpin", nid, keys[0])),
        "verify": _ok(kvctl(daemon.addr, "verify")),
    }
    for name, obj in outputs.items():
        assert isinstance(obj, dict), name
        _types_ok(obj, name)
    assert outputs["stats"] == {**outputs["stats"], **{k: outputs["status"]["stats"][k] for k in ("version",)}}
    assert outputs["stats"]["tiers"][0]["tier"] in ("dram", "disk")
    assert outputs["verify"]["done"] is True and outputs["verify"]["corrupt"] == 0


def test_kvctl_json_anywhere_and_prefixes(daemon):
    _, nid, keys = _store(daemon, "kvctl-prefix", seed=13)
    base = [sys.executable, "-m", "kvstore.cli.kvctl"]
    for argv in (["--json", "--addr", daemon.addr, "ls", "--namespace", nid[:10]],
                 ["ls", "--namespace", nid[:10], "--json", "--addr", daemon.addr],
                 ["--addr", daemon.addr, "ls", "--json", "--namespace", nid[:10]]):
        r = subprocess.run(base + argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (argv, r.stderr)
        assert sorted(e["key"] for e in json.loads(r.stdout)["keys"]) == sorted(keys)
    info = _ok(kvctl(daemon.addr, "inspect", nid[:8], keys[0][:12]))
    assert info["entry"]["key"] == keys[0] and info["namespace"]["namespace_id"] == nid
    # ambiguous prefix: exit 2 listing the candidates. 17 namespaces share a first digit somewhere.
    for i in range(17):
        with KVStoreClient(daemon.addr, smol_ns(f"kvctl-prefix-{i}", num_layers=2)):
            pass
    ids = [n["namespace_id"] for n in _ok(kvctl(daemon.addr, "namespaces"))["namespaces"]]
    first = [i[0] for i in ids]
    shared = next(c for c in first if first.count(c) > 1)
    r = kvctl(daemon.addr, "ls", "--namespace", shared)
    assert r.returncode == 2 and "ambiguous" in r.stderr
    assert sum(i in r.stderr for i in ids if i.startswith(shared)) >= 2
    # no match: exit 1; not hex: exit 2
    r = kvctl(daemon.addr, "ls", "--namespace", next(h for h in (f"{x:04x}" for x in range(65536))
                                                      if not any(i.startswith(h) for i in ids)))
    assert r.returncode == 1 and "no namespace id starts with" in r.stderr
    r = kvctl(daemon.addr, "ls", "--namespace", "xyz")
    assert r.returncode == 2 and "must be hex" in r.stderr and "Traceback" not in r.stderr


def test_kvctl_exit_codes(daemon):
    _, nid, keys = _store(daemon, "kvctl-exit", seed=15)
    other = "f" * 64
    r = kvctl(daemon.addr, "evict", "--namespace", nid, "0" * 64)
    assert r.returncode == 1 and json.loads(r.stdout) == {"evicted": 0}
    r = kvctl(daemon.addr, "clear", "--tenant", "nobody-has-this")
    assert r.returncode == 1 and json.loads(r.stdout) == {"deleted": 0}
    r = kvctl(daemon.addr, "inspect", other, keys[0])
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr
    r = kvctl(daemon.addr, "evict", keys[0])
    assert r.returncode == 2 and "needs --namespace" in r.stderr
    r = kvctl(daemon.addr, "frobnicate")
    assert r.returncode == 2
    r = subprocess.run([sys.executable, "-m", "kvstore.cli.kvctl", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "exit status" in r.stdout and "nothing matched" in r.stdout


def test_kvctl_admin_token(auth_daemon):
    from .helpers import ADMIN_TOKEN, TOKENS
    alice = next(t for t, e in TOKENS.items() if e["tenant"] == "alice")
    r = kvctl(auth_daemon.addr, "stats", token=alice)
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr
    assert _ok(kvctl(auth_daemon.addr, "stats", token=ADMIN_TOKEN))["tiers"]
    # status is a health check: no token needed
    st = _ok(kvctl(auth_daemon.addr, "status"))
    assert st["health"] == "serving" and st["stats"] is None and "token" in st["stats_error"]
    assert _ok(kvctl(auth_daemon.addr, "status", token=ADMIN_TOKEN))["stats"]["tiers"]


def test_kvctl_daemon_down():
    from .helpers import free_port
    addr = f"127.0.0.1:{free_port()}"
    r = kvctl(addr, "status")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"kvctl: cannot reach kvstore at {addr}: is the daemon running? "
                                "start it with `kvstore serve`")
    assert "Traceback" not in r.stderr


def test_tenant_usage_in_kvctl_and_metrics(daemon_factory):
    """What each tenant holds against its quotas: `kvctl tenants` and the kvstore_tenant_*
    gauges agree with what the tenants stored, per tenant (another tenant's use never shows
    under the first one's name)."""
    import urllib.request

    from .helpers import ADMIN_TOKEN, TOKENS, free_port
    alice = next(t for t, e in TOKENS.items() if e["tenant"] == "alice")
    bob = next(t for t, e in TOKENS.items() if e["tenant"] == "bob")
    port = free_port()
    d = daemon_factory(auth=True, settings=(f'metrics.listen="127.0.0.1:{port}"', "quotas.max_dram_bytes=32MiB",
                                            "quotas.max_pinned_bytes=4MiB"))
    ns = smol_ns("tenant-usage", num_layers=2)
    toks = tokens_for(1024, seed=31)
    with KVStoreClient(d.addr, ns, token=alice, local=False) as a, \
            KVStoreClient(d.addr, ns, token=bob, local=False) as b:
        assert a.store(toks, kv_for(ns, 1024)) == 4
        assert b.store(toks[:256], kv_for(ns, 256)) == 1
        a.lookup(toks, pin_ttl_s=30)
    chunk = ns.chunk_bytes()
    usage = {t["tenant"]: {q["quota"]: q for q in t["quotas"]}
             for t in _ok(kvctl(d.addr, "tenants", token=ADMIN_TOKEN))["tenants"]}
    assert set(usage) >= {"alice", "bob"}
    assert usage["alice"]["max_dram_bytes"]["used"] >= 4 * chunk
    assert usage["bob"]["max_dram_bytes"]["used"] < 2 * chunk
    assert usage["alice"]["max_dram_bytes"]["limit"] == 32 << 20
    assert usage["alice"]["max_disk_bytes"]["unlimited"] is True
    assert usage["alice"]["max_namespaces"]["used"] == 1 and usage["bob"]["max_namespaces"]["used"] == 1
    assert 4 * chunk <= usage["alice"]["max_pinned_bytes"]["used"] <= 4 << 20     # its lookup pinned 4 chunks
    assert usage["bob"]["max_pinned_bytes"]["used"] == 0
    human = kvctl(d.addr, "tenants", token=ADMIN_TOKEN, json_flag=False)
    assert human.returncode == 0 and "alice" in human.stdout and "max_dram_bytes" in human.stdout
    r = kvctl(d.addr, "tenants", token=alice)
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr    # admin only
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    rows = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("kvstore_tenant_")}
    assert rows['kvstore_tenant_used{quota="max_dram_bytes",tenant="alice"}'] == usage["alice"]["max_dram_bytes"]["used"]
    assert rows['kvstore_tenant_limit{quota="max_dram_bytes",tenant="bob"}'] == 32 << 20
    assert 'kvstore_tenant_limit{quota="max_disk_bytes",tenant="alice"}' not in rows    # unlimited
