"""The connector's pieces that need no engine: paged layouts, namespace, config (fast)."""

from __future__ import annotations

import pytest
import torch

import vllm_harness as harness

from kvstore_client.engines.vllm.config import ConnectorConfig
from kvstore_client.engines.vllm.layout import LayoutError, PagedLayout
from kvstore_wire.keys import Namespace

L, H, D, N = 4, 3, 8, 16


def _ns(dtype="float32", **kw) -> Namespace:
    return Namespace(model="m@sha256:x", dtype=dtype, num_layers=L, num_kv_heads=H, head_dim=D,
                     chunk_tokens=2 * N, **kw)


def _caches(blocks=6, flash=False, dtype=torch.float32):
    return {f"model.layers.{i}.self_attn.attn": torch.zeros(blocks, H, N, 2 * D, dtype=dtype) for i in range(L)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["CPU_ATTN", "FLASH_ATTN"])
def test_scatter_then_gather_round_trips_and_lands_where_the_backend_reads(backend, dtype):
    caches = _caches(dtype=dtype)
    ns = _ns("float32" if dtype == torch.float32 else "bfloat16")
    layout = PagedLayout(caches, {k: backend for k in caches}, ns, N)
    kv = torch.randn(ns.chunk_shape(4 * N)).to(dtype)
    blocks = [5, 1, 3, 0]
    layout.scatter(kv, 0, blocks)
    out = torch.empty_like(kv)
    layout.gather(blocks, out)
    assert torch.equal(out, kv)
    layer0 = caches["model.layers.0.self_attn.attn"]
    # Token 1 of the chunk (block 5, offset 1), head 2: where the backend's kernel reads K and V.
    if backend == "CPU_ATTN":      # a (block, head) tile: K dim-major [D, N], then V token-major [N, D]
        tile = layer0.view(6, H, 2 * N * D)
        k, v = tile[5, 2, torch.arange(D) * N + 1], tile[5, 2, N * D + D:N * D + 2 * D]
    else:                          # [B, H, N, 2D]: [K | V] on the last axis
        k, v = layer0[5, 2, 1, :D], layer0[5, 2, 1, D:]
    assert torch.equal(k, kv[0, 0, 1, 2]) and torch.equal(v, kv[0, 1, 1, 2])


def test_cpu_tile_probe_finds_the_layout_of_vllms_own_cache_kernel(vllm_env):
    """vLLM's CPU cache kernel (``cpu_attn_reshape_and_cache``, the ISA vLLM picks here) writes
    tokens where ``CPU_TILE`` views read them, for each dtype the connector stores (an AMX
    kernel's bf16 tiles are another order: opaque, copied as whole blocks); run in the vLLM
    venv (the test process has no vLLM)."""
    import subprocess

    code = ("import torch, json; from kvstore_client.engines.vllm.layout import probe_cpu_tile; "
            "print(json.dumps([probe_cpu_tile(d, 128, 3, 64) for d in (torch.float32, torch.float16, torch.bfloat16)]))")
    r = subprocess.run([str(vllm_env), "-c", code], capture_output=True, text=True, timeout=300,
                       env={**harness.VLLM_ENV, "PATH": "/usr/bin:/bin", "PYTHONPATH": harness.client_pythonpath()})
    assert r.returncode == 0, r.stderr[-2000:]
    got = __import__("json").loads(r.stdout.strip().splitlines()[-1])
    assert got[0][0] == "cpu_tile", got                  # fp32, the tests' and benchmark's dtype
    for split, isa in got:                                # vec/vec16 are known; others (AMX for
        assert split == "cpu_tile" if isa in ("vec", "vec16") else split in ("cpu_tile", "opaque"), got  # bf16)


def test_partial_scatter_skips_blocks_vllm_already_has():
    caches = _caches()
    layout = PagedLayout(caches, {k: "CPU_ATTN" for k in caches}, _ns(), N)
    kv = torch.randn(_ns().chunk_shape(2 * N))
    layout.scatter(kv, 1, [4])               # only the second block of the chunk
    out = torch.empty(_ns().chunk_shape(N))
    layout.gather([4], out)
    assert torch.equal(out, kv[:, :, N:])
    assert caches["model.layers.0.self_attn.attn"][:4].abs().sum() == 0


def test_unknown_backend_and_wrong_shapes_are_refused():
    caches = _caches()
    with pytest.raises(LayoutError, match="FLEX_ATTENTION"):
        PagedLayout(caches, {k: "FLEX_ATTENTION" for k in caches}, _ns(), N)
    bad = {k: torch.zeros(6, H, N, D) for k in caches}
    with pytest.raises(LayoutError, match="does not match"):
        PagedLayout(bad, {k: "CPU_ATTN" for k in bad}, _ns(), N)


def test_namespaces_differ_by_tp_rank_size_and_identity():
    ids = {_ns().namespace_id, _ns(tp_size=2).namespace_id, _ns(tp_size=2, tp_rank=1).namespace_id,
           Namespace(model="other@sha256:y", dtype="float32", num_layers=L, num_kv_heads=H, head_dim=D,
                     chunk_tokens=2 * N).namespace_id}
    assert len(ids) == 4


def test_config_rejects_unknown_keys_bad_tls_and_misaligned_chunks(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        ConnectorConfig.from_extra_config({"kvstore.adr": "x"})
    assert ConnectorConfig.from_extra_config({"kvstore.tls": True}).tls is not None
    assert ConnectorConfig.from_extra_config({"kvstore.tls": False}).tls is None
    with pytest.raises(ValueError, match="unknown keys"):
        ConnectorConfig.from_extra_config({"kvstore.tls": {"ca": "x"}})
    with pytest.raises(ValueError, match="not a readable file"):
        ConnectorConfig.from_extra_config({"kvstore.tls": {"ca_file": str(tmp_path / "missing.pem")}})
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ValueError, match="cert_file and key_file"):
        ConnectorConfig.from_extra_config({"kvstore.tls": {"cert_file": str(tmp_path / "c.pem")}})
    with pytest.raises(ValueError, match="plaintext"):
        ConnectorConfig.from_extra_config({"kvstore.addr": "10.0.0.5:50051", "kvstore.token": "t"})
    assert ConnectorConfig.from_extra_config({"kvstore.addr": "10.0.0.5:50051", "kvstore.token": "t",
                                              "kvstore.tls": True}).token == "t"
    assert ConnectorConfig.from_extra_config({}).partial_chunks is True
    cfg = ConnectorConfig.from_extra_config({"kvstore.chunk_tokens": 192})
    with pytest.raises(ValueError, match="multiple of vLLM's block size"):
        cfg.check_block_size(128)
    assert ConnectorConfig.from_extra_config({"kvstore.durability": "persisted"}).durability.name == "PERSISTED"
    # Default chunk: one CPU block (128), whole GPU blocks of at least 128 tokens.
    assert ConnectorConfig.from_extra_config({}).for_block_size(128).chunk_tokens == 128
    assert ConnectorConfig.from_extra_config({}).for_block_size(16).chunk_tokens == 128
    assert ConnectorConfig.from_extra_config({}).for_block_size(48).chunk_tokens == 144
    assert ConnectorConfig.from_extra_config({"kvstore.chunk_tokens": 256}).for_block_size(128).chunk_tokens == 256
    with pytest.raises(ValueError, match="multiple of vLLM's block size"):
        cfg.for_block_size(128)


@pytest.mark.parametrize("backend", ["CPU_ATTN", "FLASH_ATTN"])
@pytest.mark.parametrize("skip", [0, 1])
def test_scatter_chunk_from_a_read_only_view_writes_only_the_blocks_asked(backend, skip):
    """A leased chunk (read-only uint8 bytes in the namespace layout) goes straight into the
    blocks: the native path (CPU_ATTN) and the torch path (FLASH_ATTN views) agree."""
    caches = _caches()
    layout = PagedLayout(caches, {k: backend for k in caches}, _ns(), N)
    kv = torch.randn(_ns().chunk_shape(2 * N))
    view = kv.numpy().view("uint8").reshape(-1)
    view.flags.writeable = False
    layout.scatter_chunk(view, 2 * N, skip, [4, 2][skip:])
    out = torch.empty(_ns().chunk_shape(2 * N))
    layout.gather([4, 2], out)
    assert torch.equal(out[:, :, skip * N:], kv[:, :, skip * N:])
    if skip:
        assert out[:, :, :N].abs().sum() == 0     # block 4 untouched
    with pytest.raises(LayoutError, match="do not fit"):
        layout.scatter_chunk(view, 2 * N, 1, [0, 1])


def test_scatter_leased_maps_chunks_onto_the_request_blocks_from_first_block():
    from kvstore_client._views import LeasedChunk, LeasedViews
    from kvstore_client.engines.vllm.layout import scatter_leased

    caches = _caches(blocks=8)
    layout = PagedLayout(caches, {k: "CPU_ATTN" for k in caches}, _ns(), N)
    kv = torch.randn(_ns().chunk_shape(6 * N))            # 3 chunks of 2 blocks
    chunks = [LeasedChunk(i, kv[:, :, i * 2 * N:(i + 1) * 2 * N].contiguous().numpy().view("uint8").reshape(-1),
                          False) for i in range(3)]
    lv = LeasedViews(chunks, 2 * N)
    table = [7, 6, 5, 4, 3, 2]                            # the request's blocks
    scatter_leased(layout, lv, 1, table[1:])              # vLLM has block 0
    out = torch.empty(_ns().chunk_shape(5 * N))
    layout.gather(table[1:], out)
    assert torch.equal(out, kv[:, :, N:])
    assert caches["model.layers.0.self_attn.attn"][7].abs().sum() == 0


@pytest.mark.parametrize("backend", ["CPU_ATTN", "FLASH_ATTN"])
@pytest.mark.parametrize("skip", [0, 1])
def test_a_trailing_partial_chunk_fills_only_its_rows_of_the_last_block(backend, skip):
    """A partial chunk of 1.5 blocks: the first block whole, then the first N/2 rows of the
    second; the rows after them (where vLLM computes the next tokens) are left alone."""
    caches = _caches()
    for t in caches.values():
        t.fill_(7.0)
    layout = PagedLayout(caches, {k: backend for k in caches}, _ns(), N)
    tokens = N + N // 2
    kv = torch.randn(_ns().chunk_shape(tokens))
    view = kv.numpy().view("uint8").reshape(-1)
    view.flags.writeable = False
    layout.scatter_chunk(view, tokens, skip, [4, 2][skip:])
    out = torch.empty(_ns().chunk_shape(2 * N))
    layout.gather([4, 2], out)
    assert torch.equal(out[:, :, skip * N:tokens], kv[:, :, skip * N:])
    assert (out[:, :, tokens:] == 7.0).all()              # the last block's other rows
    if skip:
        assert (out[:, :, :N] == 7.0).all()
    with pytest.raises(LayoutError, match="do not fit"):
        layout.scatter_chunk(view, tokens, 1, [0, 1])
    # The same through a torch tensor ending inside its last block.
    for t in caches.values():
        t.fill_(7.0)
    layout.scatter(kv, 0, [4, 2])
    layout.gather([4, 2], out)
    assert torch.equal(out[:, :, :tokens], kv) and (out[:, :, tokens:] == 7.0).all()


def test_leased_loader_loads_a_trailing_partial_chunk(daemon):
    """Whole chunks and the trailing partial one, stored by the client and leased back into
    the blocks: the tokens arrive exactly, the partial block's other rows stay; without the
    tail stored the load stops at the last whole chunk."""
    from kvstore_client import KVStoreClient

    from kvstore_client.engines.vllm.loader import LeasedLoader

    caches = _caches(blocks=10)
    ns = _ns()
    layout = PagedLayout(caches, {k: "CPU_ATTN" for k in caches}, ns, N)
    total = 2 * 2 * N + N + 5                              # 2 chunks, then a 21-token tail: 6 blocks
    toks = list(range(9100, 9100 + total))
    kv = torch.randn(ns.chunk_shape(total))
    table = [9, 8, 7, 6, 5, 4]
    with KVStoreClient(daemon.addr, ns) as c:
        assert c.store(toks, kv) == 2
        loader = LeasedLoader(layout, ns)
        try:
            assert loader.load(c, toks, 0, table) == 4 * N       # no tail stored yet
            assert c.store(toks, kv, include_partial=True) == 1
            for t in caches.values():
                t.fill_(7.0)
            assert loader.load(c, toks, 1, table[1:]) == total  # vLLM has block 0
            out = torch.empty(ns.chunk_shape(6 * N))
            layout.gather(table, out)
            assert torch.equal(out[:, :, N:total], kv[:, :, N:])
            assert (out[:, :, :N] == 7.0).all() and (out[:, :, total:] == 7.0).all()
        finally:
            loader.close()


@pytest.mark.parametrize("group_chunks", [1, 64])
def test_leased_loader_scatters_from_the_arena_and_stops_at_the_first_missing_chunk(daemon, group_chunks):
    """A real daemon: chunks stored through the client land in the blocks straight from the
    leased arena views; pipelined groups (1 chunk each) and one group give the same."""
    from kvstore_client import KVStoreClient

    from kvstore_client.engines.vllm.loader import LeasedLoader

    caches = _caches(blocks=10)
    ns = _ns()
    layout = PagedLayout(caches, {k: "CPU_ATTN" for k in caches}, ns, N)
    toks = list(range(700 + group_chunks, 700 + group_chunks + 8 * N))  # 4 chunks of 2 blocks
    kv = torch.randn(ns.chunk_shape(8 * N))
    table = [9, 8, 7, 6, 5, 4, 3, 2]
    with KVStoreClient(daemon.addr, ns) as c:
        assert c.transport == "shm"
        assert c.store(toks, kv) == 4
        loader = LeasedLoader(layout, ns)
        loader.group_chunks = group_chunks
        try:
            assert loader.load(c, toks, 0, table) == 8 * N
            out = torch.empty(ns.chunk_shape(8 * N))
            layout.gather(table, out)
            assert torch.equal(out, kv)
            for t in caches.values():
                t.zero_()
            assert loader.load(c, toks, 3, table[3:]) == 8 * N      # vLLM has blocks 0-2
            layout.gather(table[3:], out[:, :, :5 * N])
            assert torch.equal(out[:, :, :5 * N], kv[:, :, 3 * N:])
            assert caches["model.layers.0.self_attn.attn"][[9, 8, 7]].abs().sum() == 0
            assert c.delete([c.keys(toks)[2]]) == 1
            assert loader.load(c, toks, 0, table) == 4 * N          # chunks 0 and 1 only
        finally:
            loader.close()


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"])
@pytest.mark.parametrize("physical", ["NHD", "HND", "layers-in-one-buffer"])
def test_gpu_backend_layouts_are_read_from_strides(backend, physical):
    """The logical [B, H, N, 2D] views vLLM hands a connector over NHD and HND memory, and
    per-layer views into one buffer with blocks outermost: a chunk lands where
    ``view[..., :D]`` / ``view[..., D:]`` (the backends' own K/V split) reads it."""
    B = 6
    if physical == "NHD":          # memory [B, N, H, 2D]
        caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(B, N, H, 2 * D).permute(0, 2, 1, 3)
                  for i in range(L)}
    elif physical == "HND":        # memory [B, H, N, 2D]
        caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(B, H, N, 2 * D) for i in range(L)}
    else:                          # memory [B, L, N, H, 2D]: one buffer, each layer a strided view
        buf = torch.zeros(B, L, N, H, 2 * D)
        caches = {f"model.layers.{i}.self_attn.attn": buf[:, i].permute(0, 2, 1, 3) for i in range(L)}
    layout = PagedLayout(caches, {k: backend for k in caches}, _ns(), N)
    kv = torch.randn(_ns().chunk_shape(2 * N + 3))
    blocks = [4, 1, 5]
    layout.scatter(kv, 0, blocks)
    for i, t in enumerate(caches.values()):
        for tok in (0, N - 1, N, 2 * N + 2):
            b, r = blocks[tok // N], tok % N
            assert torch.equal(t[b, :, r, :D], kv[i, 0, tok]) and torch.equal(t[b, :, r, D:], kv[i, 1, tok])
    out = torch.zeros(_ns().chunk_shape(3 * N))
    layout.gather(blocks, out)
    assert torch.equal(out[:, :, :2 * N + 3], kv)
