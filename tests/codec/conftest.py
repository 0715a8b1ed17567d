"""Fixtures of the codec tests: small real-looking KV chunks and bitstream surgery helpers."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore_testing.codec_data import synthetic_kv

try:
    import torch

    HAVE_CUDA = torch.cuda.is_available()
except Exception:  # torch missing or broken: no GPU tests
    HAVE_CUDA = False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and libkvstore_cuda.so")


def pytest_collection_modifyitems(config, items):
    if HAVE_CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        # The marker, not the keyword: keywords include every directory name of the path, so a
        # checkout under a folder called "gpu" would otherwise skip the whole suite.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kv_small():
    return synthetic_kv()
