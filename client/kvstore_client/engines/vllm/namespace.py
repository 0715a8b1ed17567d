"""The namespace of one vLLM engine's KV: everything that makes two engines' KV incompatible.

``Namespace(model=<identity>, dtype=<KV cache dtype>, num_layers, num_kv_heads (per TP rank),
head_dim, tp_rank, tp_size, chunk_tokens)``. The identity is ``<model>@<content digest>``:

- a local checkpoint directory: SHA-256 over ``config.json`` and every weight file's bytes
  (two fine-tunes with the same shapes must not share); the digest is memoised in
  ``~/.cache/kvstore/model-digests.json`` keyed by (path, size, mtime), so it is paid once
  per checkpoint (about 0.5 s per GB), not per engine start;
- a hub id: ``<id>@rev:<revision>`` (vLLM resolves the revision it loads);
- ``kvstore.model_id`` in the connector config overrides both (e.g. a registry digest).

vLLM's block size is not part of it: blocks change where KV lives, not its bytes; the chunk
size is, since it decides the keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kvstore_wire.keys import Namespace
from kvstore_wire.types import DType

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_HASH_BLOCK_BYTES = 8 << 20
_DIGEST_CACHE = Path(os.environ.get("KVSTORE_CACHE_DIR", Path.home() / ".cache" / "kvstore")) / "model-digests.json"


def kv_dtype(vllm_config: Any) -> DType:
    """The dtype of the KV cache vLLM allocates (``cache_dtype``, or the model's for ``auto``)."""
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype in (None, "auto"):
        return DType.parse(str(vllm_config.model_config.dtype))
    return DType.parse(str(cache_dtype))


def namespace_for(vllm_config: Any, chunk_tokens: int, model_id: str | None = None,
                  tp_rank: int = 0) -> Namespace:
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    return Namespace(model=model_id or model_identity(mc), dtype=kv_dtype(vllm_config),
                     num_layers=mc.get_num_layers(pc), num_kv_heads=mc.get_num_kv_heads(pc),
                     head_dim=mc.get_head_size(), tp_rank=tp_rank, tp_size=pc.tensor_parallel_size,
                     chunk_tokens=chunk_tokens)


def model_identity(model_config: Any) -> str:
    path = Path(str(model_config.model))
    if path.is_dir():
        return f"{path.name}@sha256:{checkpoint_digest(path)[:32]}"
    rev = getattr(model_config, "revision", None) or "main"
    return f"{model_config.model}@rev:{rev}"


def checkpoint_digest(directory: Path) -> str:
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and (p.name == "config.json" or p.suffix in _WEIGHT_SUFFIXES))
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    key = str(directory.resolve())
    cache = _read_cache()
    hit = cache.get(key)
    if hit and hit.get("stamp") == stamp:
        return hit["sha256"]
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            while block := f.read(_HASH_BLOCK_BYTES):
                h.update(block)
    digest = h.hexdigest()
    cache[key] = {"stamp": stamp, "sha256": digest}
    _write_cache(cache)
    return digest


def _read_cache() -> dict:
    try:
        return json.loads(_DIGEST_CACHE.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    try:
        _DIGEST_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = _DIGEST_CACHE.with_name(f"{_DIGEST_CACHE.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, _DIGEST_CACHE)
    except OSError:
        pass   # a read-only home: the digest is recomputed next start, nothing else changes
