"""Where no GPU exists, the HBM tier is absent cleanly (runs on the CI machine; the HBM tier's
own suites are tests/gpu/test_paths.py and tests/gpu/test_hbm_contract.py):

- its factory raises FailedPrecondition;
- a chain config naming "hbm" fails to build, and a daemon with it refuses to start, with a
  message naming ``chain.tiers``;
- a chain without "hbm" never imports the HBM tier's module (no CUDA code is loaded)."""

import subprocess
import sys

import pytest

from kvstore_native import cuda_ipc

pytestmark = pytest.mark.skipif(cuda_ipc.available(), reason="a GPU is present")


def test_hbm_tier_absent_cleanly_without_gpu():
    from kvstore.errors import FailedPrecondition
    from kvstore.tiers.hbm import make_hbm_tier

    with pytest.raises(FailedPrecondition, match="chain.tiers"):
        make_hbm_tier(1 << 20)


def test_chain_naming_hbm_fails_to_build_naming_the_key(tmp_path):
    from kvstore import config as cfg
    from kvstore.chain import build_chain
    from kvstore.errors import FailedPrecondition

    c = cfg.Config(disk=cfg.DiskConfig(path=tmp_path), chain=cfg.ChainConfig(tiers=["hbm", "dram", "disk"]))
    assert c.hbm.capacity_bytes > 0 and c.hbm.device == 0
    with pytest.raises(FailedPrecondition, match=r"chain\.tiers names 'hbm'.*remove 'hbm' from chain\.tiers"):
        build_chain(c)


def test_daemon_with_hbm_tier_refuses_to_start_naming_the_key(tmp_path):
    from kvstore_testing.daemon import DaemonStartError, spawn_daemon

    d = spawn_daemon(base_dir=tmp_path, settings=['chain.tiers=["hbm","dram"]', 'metrics.listen=""',
                                                   "dram.capacity_bytes=16MiB"], start=False)
    try:
        with pytest.raises(DaemonStartError) as err:
            d.start()
        assert "chain.tiers" in str(err.value) and "hbm" in str(err.value)
        assert "Traceback" not in d.log_tail()
    finally:
        d.close()


def test_chain_without_hbm_loads_no_cuda_code(tmp_path):
    code = ("import sys; from kvstore import config as cfg; from kvstore.chain import build_chain; "
            f"c = build_chain(cfg.Config(disk=cfg.DiskConfig(path={str(tmp_path)!r}))); c.close(); "
            "print('kvstore.tiers.hbm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
