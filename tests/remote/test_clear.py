"""Clearing a namespace or a tenant deletes its values from the shared Redis Cluster too
(``kvctl clear``, Admin Clear): a tenant that clears expects its KV gone on every replica
that has not already copied it, not kept until the TTL. Real daemons, the real cluster."""

from __future__ import annotations

import subprocess
import sys

from kvstore.tiers.remote import RemoteTier
from kvstore.types import ChunkId
from kvstore_client import KVStoreClient
from kvstore_testing.data import kv_for, smol_ns, tokens_for

from .conftest import ready, remote_config
from .replicas import HIT_TIMEOUT_MS, SECRET, TOK_X, TOK_Y, replica, uploads, wait_uploaded


def _store(a, name: str, seed: int, chunks: int = 2) -> tuple[list[int], list[ChunkId], bytes]:
    ns = smol_ns(name)
    toks = tokens_for(chunks * 256, seed=seed)
    before = uploads(a)
    with KVStoreClient(a.addr, ns, token=TOK_X, local=False) as c:
        assert c.store(toks, kv_for(ns, chunks * 256, seed=seed)) == chunks
        wait_uploaded(a, chunks, before)
        return toks, [ChunkId(c.namespace_id + k) for k in c.keys(toks)], c.namespace_id


def _kvctl(addr: str, token: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvstore.cli.kvctl", "--addr", addr, "--token", token, *args],
                          capture_output=True, text=True, timeout=120)


def test_clear_deletes_remote_values_for_every_replica(redis_cluster, tmp_path, request):
    tier = ready(RemoteTier(remote_config(redis_cluster, key_secret=SECRET)))
    try:
        with replica(redis_cluster, tmp_path, "a", timeout_ms=HIT_TIMEOUT_MS) as a, \
                replica(redis_cluster, tmp_path, "b", timeout_ms=HIT_TIMEOUT_MS) as b:
            t1, c1, ns1 = _store(a, f"clear-1-{request.node.name}", seed=11)
            t2, c2, _ = _store(a, f"clear-2-{request.node.name}", seed=12)
            assert tier.contains_many(c1 + c2) == [True] * 4
            # Another tenant cannot clear X's namespace (and nothing is deleted).
            r = _kvctl(a.addr, TOK_Y, "clear", "--namespace", ns1.hex())
            assert r.returncode != 0
            assert tier.contains_many(c1) == [True, True]

            r = _kvctl(a.addr, TOK_X, "clear", "--namespace", ns1.hex())
            assert r.returncode == 0, r.stderr
            assert "deleted 2 chunk(s)" in r.stdout
            assert tier.contains_many(c1) == [False, False]          # gone from Redis
            assert tier.contains_many(c2) == [True, True]            # the other namespace stays
            with KVStoreClient(b.addr, smol_ns(f"clear-1-{request.node.name}"), token=TOK_X, local=False) as cb:
                assert cb.lookup(t1).matched_chunks == 0              # B never held it: a miss now

            # Deleting the tenant removes the rest of its remote values.
            r = _kvctl(a.addr, TOK_X, "clear", "--tenant", "tenant-x")
            assert r.returncode == 0, r.stderr
            assert tier.contains_many(c2) == [False, False]
            with KVStoreClient(b.addr, smol_ns(f"clear-2-{request.node.name}"), token=TOK_X, local=False) as cb:
                assert cb.lookup(t2).matched_chunks == 0
    finally:
        tier.close()


def test_remote_level_never_clears_the_whole_deployment(redis_cluster, tmp_path, request):
    """A prefix shorter than a namespace id (the whole store) removes nothing from Redis:
    it would delete every tenant's values of every replica."""
    tier = ready(RemoteTier(remote_config(redis_cluster, key_secret=SECRET)))
    try:
        with replica(redis_cluster, tmp_path, "a", timeout_ms=HIT_TIMEOUT_MS) as a:
            _, cids, _ = _store(a, f"clear-all-{request.node.name}", seed=13)
            from kvstore.tiers.remote.level import RemoteLevel
            from kvstore.tiers.remote.wiring import build_remote
            parts = build_remote(remote_config(redis_cluster, key_secret=SECRET))
            level = RemoteLevel(parts)
            try:
                assert level.delete_prefix(b"") == 0
                assert level.delete_prefix(cids[0][:8]) == 0
                assert tier.contains_many(cids) == [True, True]
            finally:
                level.close()
    finally:
        tier.close()
