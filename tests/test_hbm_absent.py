"""Where no GPU exists, the HBM tier is absent cleanly: its factory raises FailedPrecondition
(runs on the CI machine; the HBM tier's own suite is tests/gpu/test_paths.py)."""

import pytest


def test_hbm_tier_absent_cleanly_without_gpu():
    from kvstore.errors import FailedPrecondition
    from kvstore.tiers.hbm import make_hbm_tier
    from kvstore_native import cuda_ipc

    if cuda_ipc.available():
        pytest.skip("a GPU is present")
    with pytest.raises(FailedPrecondition):
        make_hbm_tier(1 << 20)
