"""Real vLLM engines and real daemons for the vLLM tests and bench/vllm_ttft.py.

- :func:`vllm_python` creates ``.venv-vllm`` once (tests/vllm/setup_env.sh) and returns its
  interpreter; vLLM never runs in the test process (its pins differ from the project's).
- :func:`model_dir` exports the SmolLM2 GGUF to a Hugging Face directory once per machine
  (kvstore_testing.hf_export, cached by the GGUF's digest).
- :class:`Engine` is one ``engine_runner.py`` process (one vLLM engine) kept alive for many
  requests; its start (30-40 s) is the expensive part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("VLLM_VENV", REPO / ".venv-vllm"))
RUNNER = Path(__file__).resolve().parent / "engine_runner.py"
MODEL_CACHE = Path(os.environ.get("KVSTORE_MODEL_CACHE", "/tmp/kvstore-models"))
#: An engine start plus the first requests on 2 loaded cores stays well below this.
ENGINE_START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 300.0
REPLY = "@@RESULT "
#: OpenMP threads of an engine, bound to cores 0..n-1. The tests use 1: on a CPU shared with
#: other jobs, 2 spinning OpenMP threads wait on each other at every barrier (decode fell to
#: under 1 token/s); bench/vllm_ttft.py uses 2 on idle cores, as the issue's peers did.
THREADS = int(os.environ.get("KVSTORE_VLLM_THREADS", "1"))
#: Environment of every vLLM-CPU process: fp32 KV of 1 GiB, threads bound, no telemetry, offline.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{THREADS - 1}" if THREADS > 1 else "0",
            "OMP_NUM_THREADS": str(THREADS),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def client_pythonpath() -> str:
    """This checkout's thin client (wire, native, client) as a PYTHONPATH for vLLM processes."""
    return os.pathsep.join(str(REPO / d) for d in ("wire", "native", "client"))


def suite_conftest():
    """The suite's top-level tests/conftest.py (``DaemonProcess``, ``SMALL``, ``free_port``),
    loaded by path: two ``conftest`` modules cannot both be imported by name."""
    import importlib.util

    name = "kvstore_tests_root_conftest"
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))    # it imports integration.helpers
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod          # dataclasses look their module up while being defined
    spec.loader.exec_module(mod)
    return mod


def vllm_python() -> Path:
    py = VENV / "bin" / "python"
    if not (VENV / ".kvstore-ready").is_file():
        subprocess.run(["bash", str(REPO / "tests" / "vllm" / "setup_env.sh")], check=True,
                       env={**os.environ, "VLLM_VENV": str(VENV)})
    return py


def model_dir() -> Path:
    sys.path.insert(0, str(REPO / "testing"))
    from kvstore_testing.hf_export import export_hf_dir

    return export_hf_dir(MODEL_CACHE)


def connector_config(addr: str, **extra: Any) -> dict:
    cfg = {"kvstore.addr": addr, "kvstore.reconnect_s": 1.0, "kvstore.durability": "persisted"}
    cfg.update({f"kvstore.{k}": v for k, v in extra.items()})
    return {"kv_connector": "KVStoreConnector", "kv_connector_module_path": "kvstore_client.engines.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": cfg}


class Engine:
    """One vLLM engine process. ``kv_transfer_config=None`` runs vLLM without a connector."""

    def __init__(self, model: Path, kv_transfer_config: dict | None, log_path: Path,
                 python: Path | None = None, extra_env: dict | None = None) -> None:
        """``python``: another interpreter with vLLM (bench/vllm_ttft.py's LMCache venv)."""
        env = {**os.environ, **VLLM_ENV, **(extra_env or {})}
        # This checkout's thin client first (the vLLM venv's editable install may point at
        # another checkout); nothing else of the project's environment.
        env["PYTHONPATH"] = client_pythonpath()
        py = python or vllm_python()
        env["PATH"] = f"{py.parent}:{env.get('PATH', '')}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        cfg = json.dumps(kv_transfer_config) if kv_transfer_config else "none"
        self.proc = subprocess.Popen([str(py), str(RUNNER), str(model), cfg], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, env=env, text=True, bufsize=1)
        self._reply(ENGINE_START_TIMEOUT_S)

    def _reply(self, timeout_s: float) -> dict:
        import selectors
        import time

        deadline = time.monotonic() + timeout_s
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=1.0):
                    if self.proc.poll() is not None:
                        break
                    continue
                line = self.proc.stdout.readline()
                if not line:
                    break
                if line.startswith(REPLY):
                    return json.loads(line[len(REPLY):])
        finally:
            sel.close()
        self.close()
        raise RuntimeError(f"vLLM engine gave no reply (exit {self.proc.poll()}); log tail:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int = 16,
                 kv_params: dict | None = None) -> list[dict]:
        cmd = {"op": "generate", "prompts": [list(map(int, p)) for p in prompts], "max_tokens": max_tokens,
               "kv_params": kv_params}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply(REQUEST_TIMEOUT_S)["results"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def tokenize_texts(model: Path) -> dict[str, list[int]]:
    """Token ids of the offline English texts (Debian licence files), by name."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    out = {}
    for name in ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1"):
        p = Path("/usr/share/common-licenses") / name
        if p.is_file():
            out[name] = tok.encode(p.read_text(errors="replace"), add_special_tokens=False).ids
    return out
