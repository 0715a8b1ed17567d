"""GPU tests: skipped cleanly where torch, a CUDA device or libkvstore_cuda.so is missing
(they still import on the CI machine)."""

import pytest


def _cuda_ready() -> str:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    from kvstore_native import cuda_ipc

    if not cuda_ipc.available():
        return "libkvstore_cuda.so is not built"
    return ""


def pytest_collection_modifyitems(config, items):
    why = _cuda_ready()
    for item in items:
        if "tests/gpu" in str(item.fspath) and why:
            item.add_marker(pytest.mark.skip(reason=why))
