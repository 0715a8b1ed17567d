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
