"""Shapes, namespaces, tokens and random KV shared by the integration tests (and their benchmarks)."""

from __future__ import annotations

import numpy as np

from kvstore_wire.keys import Namespace

#: Auth tokens of the ``auth_daemon`` fixture: two tenants and an admin.
ADMIN_TOKEN = "admin-token-0123456789abcdef"
ALICE_TOKEN = "alice-token-0123456789abcdef"
BOB_TOKEN = "bob-token-0123456789abcdefgh"
TOKENS = {
    ADMIN_TOKEN: {"tenant": "ops", "admin": True},
    ALICE_TOKEN: {"tenant": "alice", "admin": False},
    BOB_TOKEN: {"tenant": "bob", "admin": False},
}

#: SmolLM2-135M: 30 layers, 3 KV heads, head dim 64, fp16; a 256-token chunk is 5.9 MB (> 4 MB).
SMOL = dict(dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64, chunk_tokens=256)
#: Vocabulary size of SmolLM2: random token ids stay in range.
SMOL_VOCAB = 49152
#: Offset of the token seeds from the KV seeds, so ``kv_for(seed=s)`` and ``tokens_for(seed=s)`` differ.
_TOKEN_SEED_OFFSET = 1000


def smol_ns(name: str, **kw) -> Namespace:
    """A SmolLM2-shaped namespace of model ``test/<name>``; ``kw`` overrides fields."""
    return Namespace(model=f"test/{name}", **{**SMOL, **kw})


def kv_for(ns: Namespace, tokens: int, seed: int = 0) -> np.ndarray:
    """Random KV of ``tokens`` tokens in ``ns``'s chunk shape and dtype (fp16 or fp32)."""
    rng = np.random.default_rng(seed)
    shape = list(ns.chunk_shape(tokens))
    return rng.standard_normal(shape).astype(np.float16 if ns.dtype.name == "FLOAT16" else np.float32)


def tokens_for(n: int, seed: int = 0) -> list[int]:
    """``n`` random token ids (deterministic per seed)."""
    return [int(x) for x in np.random.default_rng(seed + _TOKEN_SEED_OFFSET).integers(0, SMOL_VOCAB, n)]
