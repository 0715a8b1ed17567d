"""Namespaces never share KV: model, dtype, chunk size and tenant are all in the key."""

from __future__ import annotations

import numpy as np

from kvstore_client import KVStoreClient

from .helpers import TOKENS
from .helpers import kv_for, smol_ns, tokens_for

ALICE, BOB = [t for t, e in TOKENS.items() if not e["admin"]]


def test_different_namespaces_never_hit(daemon):
    base = smol_ns("iso", num_layers=2)
    toks = tokens_for(512, seed=5)
    with KVStoreClient(daemon.addr, base) as c:
        assert c.store(toks, kv_for(base, 512)) == 2
    others = [smol_ns("iso-other-model", num_layers=2), smol_ns("iso", num_layers=2, dtype="float32"),
              smol_ns("iso", num_layers=2, chunk_tokens=128), smol_ns("iso", num_layers=2, tp_size=2, tp_rank=1)]
    for ns in others:
        with KVStoreClient(daemon.addr, ns) as c:
            assert c.lookup(toks).matched_chunks == 0, ns
            assert c.retrieve(toks)[0] == 0, ns


def test_tenants_are_isolated(auth_daemon):
    ns = smol_ns("tenant", num_layers=2)
    toks = tokens_for(256, seed=6)
    kv = kv_for(ns, 256)
    with KVStoreClient(auth_daemon.addr, ns, token=ALICE) as a, KVStoreClient(auth_daemon.addr, ns, token=BOB) as b:
        assert a.namespace.tenant == "alice" and b.namespace.tenant == "bob"
        assert a.namespace_id != b.namespace_id
        assert a.store(toks, kv) == 1
        assert b.lookup(toks).matched_chunks == 0
        assert b.retrieve(toks)[0] == 0
        assert np.array_equal(a.retrieve(toks)[1], kv)
