"""kvctl against a real daemon (subprocess, --json) and with the daemon down."""

from __future__ import annotations

import json
import subprocess
import sys

from kvstore_client import KVStoreClient

from .helpers import kv_for, smol_ns, tokens_for


def kvctl(addr, *args, token=None):
    cmd = [sys.executable, "-m", "kvstore.cli.kvctl", "--addr", addr, "--json", *args]
    if token:
        cmd[3:3] = ["--token", token]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _ok(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_kvctl_commands(daemon):
    ns = smol_ns("kvctl", num_layers=2)
    toks = tokens_for(512, seed=11)
    with KVStoreClient(daemon.addr, ns) as c:
        c.store(toks, kv_for(ns, 512))
        nid, keys = c.namespace_id.hex(), [k.hex() for k in c.keys(toks)]
    assert _ok(kvctl(daemon.addr, "status"))["health"] == "SERVING"
    stats = _ok(kvctl(daemon.addr, "stats"))
    assert {t["tier"] for t in stats["tiers"]} >= {"DRAM"}
    assert nid in [n["namespace_id"] for n in _ok(kvctl(daemon.addr, "namespaces"))]
    listed = _ok(kvctl(daemon.addr, "ls", "--namespace", nid, "--limit", "1", "--all"))
    assert sorted(e["key"] for e in listed) == sorted(keys)
    info = _ok(kvctl(daemon.addr, "inspect", nid, keys[0]))
    assert info["num_tokens"] == 256 and info["payload_bytes"] == ns.chunk_bytes()
    assert _ok(kvctl(daemon.addr, "pin", nid, keys[0], "--ttl", "60"))["pinned"] == 1
    assert _ok(kvctl(daemon.addr, "inspect", nid, keys[0]))["pinned"] is True
    assert _ok(kvctl(daemon.addr, "unpin", nid, keys[0]))["unpinned"] == 1
    assert _ok(kvctl(daemon.addr, "evict", "--namespace", nid, keys[1]))["evicted"] >= 1
    assert _ok(kvctl(daemon.addr, "clear", "--namespace", nid))["deleted"] >= 1
    assert _ok(kvctl(daemon.addr, "ls", "--namespace", nid)) == []
    r = kvctl(daemon.addr, "inspect", nid, keys[0])
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "Traceback" not in r.stderr
    # human output works too
    r = subprocess.run([sys.executable, "-m", "kvstore.cli.kvctl", "--addr", daemon.addr, "stats"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "evictions" in r.stdout


def test_kvctl_admin_token(auth_daemon):
    from .helpers import ADMIN_TOKEN, TOKENS
    alice = next(t for t, e in TOKENS.items() if e["tenant"] == "alice")
    r = kvctl(auth_daemon.addr, "stats", token=alice)
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr
    assert _ok(kvctl(auth_daemon.addr, "stats", token=ADMIN_TOKEN))["tiers"]


def test_kvctl_daemon_down():
    from .helpers import free_port
    addr = f"127.0.0.1:{free_port()}"
    r = kvctl(addr, "status")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"kvctl: cannot reach kvstore at {addr}: is the daemon running? "
                                "start it with `kvstore serve`")
    assert "Traceback" not in r.stderr
