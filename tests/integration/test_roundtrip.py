"""Store / lookup / retrieve / exists / delete through a real daemon, bit-exact."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kvstore_client import AsyncKVStoreClient, Durability, KVStoreClient, Tier

from .helpers import kv_for, smol_ns, tokens_for


def test_roundtrip_bit_exact_smollm2_chunks(daemon):
    ns = smol_ns("roundtrip")
    assert ns.chunk_bytes() > 4 * 1024 * 1024  # beyond gRPC's default message limit
    toks = tokens_for(3 * 256 + 100)
    kv = kv_for(ns, len(toks))
    with KVStoreClient(daemon.addr, ns) as c:
        assert c.store(toks, kv) == 3
        assert c.store(toks, kv) == 0  # already present: nothing sent again
        hit = c.lookup(toks)
        assert (hit.matched_chunks, hit.matched_tokens) == (3, 768)
        assert all(t in (Tier.DRAM, Tier.DISK) for t in hit.tiers)
        n, out = c.retrieve(toks)
        assert n == 768 and out.dtype == np.float16
        assert out.shape == (30, 2, 768, 3, 64)
        assert np.array_equal(out.view(np.uint16), kv[:, :, :768].view(np.uint16))


def test_partial_prefix_exists_delete(daemon):
    ns = smol_ns("prefix")
    toks = tokens_for(4 * 256, seed=1)
    kv = kv_for(ns, len(toks), seed=1)
    with KVStoreClient(daemon.addr, ns) as c:
        assert c.store(toks[:512], kv[:, :, :512]) == 2
        diverged = toks[:256] + [7] * 768
        assert c.lookup(diverged).matched_chunks == 1
        assert c.lookup(toks).matched_chunks == 2
        keys = c.keys(toks)
        assert [t != Tier.NONE for t in c.exists(keys)] == [True, True, False, False]
        n, out = c.retrieve(toks)
        assert n == 512 and np.array_equal(out, kv[:, :, :512])
        assert c.delete([keys[1], keys[3]]) == 1
        assert c.lookup(toks).matched_chunks == 1
        assert c.retrieve(toks)[0] == 256


def test_persisted_durability_and_miss(daemon):
    ns = smol_ns("persisted")
    toks = tokens_for(256, seed=2)
    with KVStoreClient(daemon.addr, ns) as c:
        assert c.retrieve(toks)[0] == 0
        assert c.lookup(toks).matched_chunks == 0
        assert c.store(toks, kv_for(ns, 256, seed=2), durability=Durability.PERSISTED) == 1
        assert c.lookup(toks).matched_chunks == 1


def test_async_client_with_torch_bf16(daemon):
    torch = pytest.importorskip("torch")
    ns = smol_ns("aio-bf16", dtype="bfloat16", num_layers=4, chunk_tokens=64)
    toks = tokens_for(200, seed=3)
    kv = torch.randn(tuple(ns.chunk_shape(200)), dtype=torch.bfloat16)

    async def run():
        c = await AsyncKVStoreClient.connect(daemon.addr, ns)
        async with c:
            assert await c.store(toks, kv) == 3
            assert (await c.lookup(toks)).matched_tokens == 192
            n, out = await c.retrieve(toks, as_torch=True)
            return n, out

    n, out = asyncio.run(run())
    assert n == 192 and out.dtype == torch.bfloat16
    assert torch.equal(out, kv[:, :, :192])


def test_async_stream_path_retrieve_into_and_partial_chunk(daemon):
    """The async client on the stream path: ``retrieve_into`` fills the caller's buffer; a
    trailing partial chunk is not stored and ``storable_tokens`` says so."""
    ns = smol_ns("aio-into", num_layers=2, chunk_tokens=64)
    toks = tokens_for(64 * 3 + 20, seed=4)
    kv = kv_for(ns, len(toks), seed=4)

    async def run():
        async with await AsyncKVStoreClient.connect(daemon.addr, ns, local=False) as c:
            assert c.transport == "grpc"
            assert c.storable_tokens(toks, kv) == 192
            assert await c.store(toks, kv) == 3
            assert [t != Tier.NONE for t in await c.exists(c.keys(toks))] == [True] * 3
            buf = np.zeros(ns.chunk_shape(192), np.float16)
            assert await c.retrieve_into(toks, buf, verify_crc=True) == 192
            assert np.array_equal(buf, kv[:, :, :192])
            assert (await c.lookup(toks + [1] * 64)).matched_tokens == 192   # the partial chunk was dropped

    asyncio.run(run())


def test_sync_and_async_clients_have_the_same_methods():
    import inspect

    public = lambda cls: {n: inspect.signature(f) for n, f in vars(cls).items()  # noqa: E731
                          if not n.startswith("_") and callable(f) and n != "connect"}
    sync, aio = public(KVStoreClient), public(AsyncKVStoreClient)
    assert set(sync) == set(aio)
    for name in sync:
        assert list(sync[name].parameters) == list(aio[name].parameters), name
        if name == "leased_views":      # a context manager on both fronts: `with` / `async with`
            continue
        assert inspect.iscoroutinefunction(getattr(AsyncKVStoreClient, name)) != (name in ("keys", "tail_tokens", "storable_tokens"))


def test_unix_socket(daemon_factory):
    d = daemon_factory(unix=True)
    ns = smol_ns("unix", num_layers=2)
    toks = tokens_for(256)
    kv = kv_for(ns, 256)
    with KVStoreClient(d.addr, ns) as c:
        assert c.store(toks, kv) == 1
        assert np.array_equal(c.retrieve(toks)[1], kv)
