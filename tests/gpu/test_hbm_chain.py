"""The HBM tier in the chain (GPU machine only; skipped without CUDA by tests/gpu/conftest.py):

- the tier contract suite (tests/tiers/test_contract.py) over the HBM tier alone and over the
  chain ``["hbm", "dram", "disk"]`` (eviction from HBM demotes to DRAM);
- a daemon with that chain: AttachResponse exports the pool, ``KVStoreClient`` routes CUDA
  tensors to the GPU path (store, then retrieve_into: DRAM hits promoted into HBM, then
  loaded device-to-device), bit-exact for both chunk shapes, sync and async;
- the pool outlives engine processes: a second process loads the same chunks from HBM."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import pytest

from kvstore import config as cfg
from kvstore.chain import build_chain
from kvstore.tiers.base import PinTable
from kvstore_testing.daemon import spawn_daemon
from kvstore_wire.types import Tier

from tiers.conftest import BUDGET_BYTES, ChainHarness, TierHarness, chain_config
from tiers.conftest import clock, rng  # noqa: F401 - the contract suite's fixtures
from tiers.test_contract import *  # noqa: F401,F403 - the contract tests, run here with the HBM kinds

HBM_KINDS = ["hbm", "chain-hbm-dram-disk"]
SHAPES = {"smol": dict(dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64),
          "llama": dict(dtype="bfloat16", num_layers=32, num_kv_heads=8, head_dim=128)}


@pytest.fixture(params=HBM_KINDS)
def any_tier(request, tmp_path, clock):
    from kvstore.tiers.hbm import make_hbm_tier

    if request.param == "hbm":
        pins = PinTable(clock)
        h = TierHarness(make_hbm_tier(BUDGET_BYTES, 0, pins), pins)
    else:
        c = chain_config(tmp_path / "disk", chain={"tiers": ["hbm", "dram", "disk"]})
        c = c.model_copy(update={"hbm": cfg.HbmConfig(capacity_bytes=BUDGET_BYTES // 2)})
        h = ChainHarness(build_chain(c, None, clock, verify_crc=True))
    h.kind = request.param
    yield h
    h.close()


def test_eviction_from_hbm_demotes_into_dram(tmp_path, rng, clock):
    from kvstore.tiers.dram import DramTier
    from kvstore.tiers.hbm import demote_into, make_hbm_tier
    from tiers.conftest import dram_config, make_chunk

    pins = PinTable(clock)
    hbm = make_hbm_tier(BUDGET_BYTES // 4, 0, pins)
    dram = DramTier(dram_config(), pins, clock, verify_crc=True)
    demote_into(hbm, dram)
    try:
        chunks = [make_chunk(rng) for _ in range(6)]
        for cid, meta, payload in chunks:
            assert hbm.put(cid, meta, memoryview(payload).cast("B"))   # into HBM only: DRAM gets its victims
        assert hbm.stats().evictions > 0
        for cid, meta, payload in chunks:
            assert hbm.contains(cid) != dram.contains(cid)
            tier = hbm if hbm.contains(cid) else dram
            with tier.get(cid) as ref:
                assert bytes(ref.view) == payload.tobytes()
    finally:
        hbm.close()
        dram.close()


def test_chain_config_wires_hbm_first_with_demotion(tmp_path):
    c = chain_config(tmp_path / "disk", chain={"tiers": ["hbm", "dram", "disk"]})
    with build_chain(c.model_copy(update={"hbm": cfg.HbmConfig(capacity_bytes=BUDGET_BYTES)})) as chain:
        assert [lv.medium for lv in chain.levels] == [Tier.HBM, Tier.DRAM, Tier.DISK]
        hbm = chain.levels[0].tier
        assert hbm.device_pool() is hbm and hbm._on_evict is not None
        assert chain.shared_level == 1


# ---------------------------------------------------------------- through a daemon
HBM_SETTINGS = ["dram.capacity_bytes=512MiB", "disk.capacity_bytes=1GiB", 'metrics.listen=""',
                "server.worker_threads=4", "server.shutdown_grace_s=1", "hbm.capacity_bytes=1GiB",
                'chain.tiers=["hbm","dram","disk"]']


@pytest.fixture(scope="module")
def hbm_daemon(tmp_path_factory):
    d = spawn_daemon(base_dir=tmp_path_factory.mktemp("kvstore-hbm"), settings=HBM_SETTINGS)
    yield d
    d.stop()


def _kv(ns, chunks):
    import torch

    tdt = {"FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16}[ns.dtype.name]
    return torch.randn(ns.chunk_shape(ns.chunk_tokens * chunks), device="cuda").to(tdt)


@pytest.mark.parametrize("shape", SHAPES)
def test_client_routes_cuda_tensors_and_loads_from_hbm(hbm_daemon, shape):
    import torch

    from kvstore_client import KVStoreClient, Namespace

    ns = Namespace(f"hbm-{shape}", chunk_tokens=256, **SHAPES[shape])
    chunks = 6
    kv = _kv(ns, chunks)
    tokens = list(range(2000, 2000 + ns.chunk_tokens * chunks))
    with KVStoreClient(hbm_daemon.addr, ns) as c:
        assert c._core.hbm is not None and c._core.hbm.pool_bytes >= 1 << 30
        assert c.store(tokens, kv) == chunks              # routed: the GPU path (GPU CRCs)
        assert c._gpu_path is not None
        assert c.store(tokens, kv) == 0
        for rnd in range(2):   # 1st: DRAM hits promoted into HBM; 2nd: straight from the pool
            out = torch.full_like(kv, float("nan"))
            assert c.retrieve_into(tokens, out) == len(tokens)
            assert torch.equal(out, kv), rnd
        assert set(c.exists(c.keys(tokens))) == {Tier.HBM}
        assert c._gpu_path.pool() is not None


def test_async_client_routes_cuda_tensors(hbm_daemon):
    import torch

    from kvstore_client import Namespace
    from kvstore_client.aio import AsyncKVStoreClient

    ns = Namespace("hbm-async", chunk_tokens=256, **SHAPES["smol"])
    kv = _kv(ns, 4)
    tokens = list(range(7000, 7000 + ns.chunk_tokens * 4))

    async def go():
        async with await AsyncKVStoreClient.connect(hbm_daemon.addr, ns) as c:
            assert await c.store(tokens, kv) == 4
            out = torch.zeros_like(kv)
            assert await c.retrieve_into(tokens, out) == len(tokens)
            return out, c._gpu_path is not None

    out, routed = asyncio.run(go())
    assert routed and torch.equal(out, kv)


_ENGINE = r"""
import sys, torch
from kvstore_client import KVStoreClient, Namespace
ns = Namespace("hbm-restart", chunk_tokens=256, dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64)
tokens = list(range(9000, 9000 + 256 * 4))
with KVStoreClient(sys.argv[1], ns) as c:
    if sys.argv[2] == "store":
        torch.manual_seed(7)
        kv = torch.randn(ns.chunk_shape(1024), device="cuda").half()
        assert c.store(tokens, kv) == 4
        out = torch.zeros_like(kv)
        assert c.retrieve_into(tokens, out) == 1024   # promoted into HBM
    else:
        out = torch.zeros(ns.chunk_shape(1024), device="cuda", dtype=torch.float16)
        assert c.retrieve_into(tokens, out) == 1024
        assert c._gpu_path.pool() is not None
    print(c.exists(c.keys(tokens))[0].name, float(out.float().sum()))
"""


def test_pool_survives_engine_restart(hbm_daemon):
    env = dict(os.environ)
    a = subprocess.run([sys.executable, "-c", _ENGINE, hbm_daemon.addr, "store"], capture_output=True, text=True,
                       timeout=180, env=env)
    assert a.returncode == 0, a.stderr
    b = subprocess.run([sys.executable, "-c", _ENGINE, hbm_daemon.addr, "load"], capture_output=True, text=True,
                       timeout=180, env=env)
    assert b.returncode == 0, b.stderr
    assert a.stdout.split()[0] == "HBM" and b.stdout.split()[0] == "HBM"
    assert a.stdout.split()[1] == b.stdout.split()[1]


_HOLDER = r"""
import sys, time
from kvstore_client import KVStoreClient, Namespace
from kvstore_client.gpu_session import GpuSession
from kvstore_wire._proto.kvstore.v1 import local_pb2
ns = Namespace("hbm-ttl", chunk_tokens=256, dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64)
c = KVStoreClient(sys.argv[1], ns)
s = GpuSession.of(c)
keys = c.keys(list(range(256 * 4)))
r = s._lease_read(local_pb2.LeaseReadRequest(namespace_id=s.namespace_id, keys=keys, device_pool=True),
                  metadata=s._metadata, timeout=30)
print(sum(e.in_device_pool for e in r.extents), flush=True)
time.sleep(600)
"""


def test_killed_client_leases_on_the_pool_expire(tmp_path):
    """A client killed while it holds HBM-pool leases: after server.lease_ttl_s the pages are
    free again (a pool exactly 4 chunks large takes 4 new chunks)."""
    import signal

    import torch

    from kvstore_client import KVStoreClient, Namespace

    d = spawn_daemon(base_dir=tmp_path, settings=["dram.capacity_bytes=256MiB", "disk.enabled=false",
                                                   'metrics.listen=""', "server.lease_ttl_s=2",
                                                   "hbm.capacity_bytes=24MiB", 'chain.tiers=["hbm","dram"]'])
    try:
        ns = Namespace("hbm-ttl", chunk_tokens=256, **SHAPES["smol"])
        old, new = list(range(256 * 4)), list(range(50_000, 50_000 + 256 * 4))
        with KVStoreClient(d.addr, ns) as c:
            kv = _kv(ns, 4)
            out = torch.zeros_like(kv)
            assert c.store(old, kv) == 4 and c.retrieve_into(old, out) == len(old)   # now in HBM
            assert set(c.exists(c.keys(old))) == {Tier.HBM}
            p = subprocess.Popen([sys.executable, "-c", _HOLDER, d.addr], stdout=subprocess.PIPE, text=True)
            try:
                assert p.stdout.readline().strip() == "4"   # the child holds 4 pool leases
            finally:
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=30)
            assert c.delete(c.keys(old)) == 4               # pages stay leased until the TTL
            import time
            time.sleep(4)                                   # lease_ttl_s = 2, swept every second
            kv2 = _kv(ns, 4)
            assert c.store(new, kv2) == 4 and c.retrieve_into(new, out) == len(new)
            assert torch.equal(out, kv2)
            assert set(c.exists(c.keys(new))) == {Tier.HBM}  # all 4 fit: the dead client's pages came back
    finally:
        d.close()
