"""Shapes and data used across the integration tests."""

from __future__ import annotations

import socket

import numpy as np

from kvstore_client import Namespace

#: Auth tokens of the auth_daemon fixture: two tenants and an admin.
ADMIN_TOKEN = "admin-token-0123456789abcdef"
TOKENS = {
    ADMIN_TOKEN: {"tenant": "ops", "admin": True},
    "alice-token-0123456789abcdef": {"tenant": "alice", "admin": False},
    "bob-token-0123456789abcdefgh": {"tenant": "bob", "admin": False},
}

#: SmolLM2-135M: 30 layers, 3 KV heads, head dim 64, fp16; a 256-token chunk is 5.9 MB (> 4 MB).
SMOL = dict(dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64, chunk_tokens=256)


def smol_ns(name: str, **kw) -> Namespace:
    return Namespace(model=f"test/{name}", **{**SMOL, **kw})


def kv_for(ns: Namespace, tokens: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = list(ns.chunk_shape(tokens))
    return rng.standard_normal(shape).astype(np.float16 if ns.dtype.name == "FLOAT16" else np.float32)


def tokens_for(n: int, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed + 1000).integers(0, 49152, n)]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
