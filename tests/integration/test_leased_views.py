"""``leased_views``: stored chunks handed out as read-only views of the leased arena extents
(no copy), against a real daemon; the stream path gives the same chunks in owned memory."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kvstore_client import AsyncKVStoreClient, KVStoreClient, Namespace
from kvstore_client.errors import DataLoss

NS = dict(model="leased-views-test", dtype="float16", num_layers=4, num_kv_heads=2, head_dim=32, chunk_tokens=64)


def kv_for(tokens: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, 2, tokens, 2, 32)).astype(np.float16)


def chunk_of(kv: np.ndarray, i: int) -> np.ndarray:
    return np.ascontiguousarray(kv[:, :, i * 64:(i + 1) * 64]).view(np.uint8).reshape(-1)


def test_views_are_the_leased_arena_bytes_read_only_and_stop_at_the_first_gap(daemon):
    toks = list(range(5000, 5000 + 64 * 4))
    kv = kv_for(len(toks), 1)
    with KVStoreClient(daemon.addr, Namespace(**NS)) as c:
        assert c.transport == "shm"
        assert c.store(toks, kv) == 4
        keys = c.keys(toks)
        with c.leased_views(keys) as lv:
            assert lv.matched == 4 and lv.matched_tokens == 256 and lv.lease_id != 0
            for i, ch in enumerate(lv.chunks):
                assert ch.index == i and ch.leased
                assert not ch.data.flags.writeable
                assert np.array_equal(ch.data, chunk_of(kv, i))
            with pytest.raises(ValueError):
                lv.chunks[0].data[0] = 1
        assert lv.chunks == []            # handed back with the lease
        with c.leased_views(keys, verify_crc=True) as lv:
            assert lv.matched == 4
        assert c.delete([keys[2]]) == 1
        with c.leased_views(keys) as lv:
            assert lv.matched == 2
            assert all(np.array_equal(ch.data, chunk_of(kv, i)) for i, ch in enumerate(lv.chunks))
        with c.leased_views([]) as lv:
            assert lv.matched == 0 and lv.lease_id == 0


def test_stream_path_gives_the_same_chunks_in_owned_memory(daemon):
    toks = list(range(9000, 9000 + 64 * 3))
    kv = kv_for(len(toks), 2)
    with KVStoreClient(daemon.addr, Namespace(**NS)) as shm, \
            KVStoreClient(daemon.addr, Namespace(**NS), local=False) as stream:
        shm.store(toks, kv)
        with stream.leased_views(stream.keys(toks)) as lv:
            assert lv.matched == 3 and lv.lease_id == 0
            for i, ch in enumerate(lv.chunks):
                assert not ch.leased and not ch.data.flags.writeable and ch.data.flags.c_contiguous
                assert np.array_equal(ch.data, chunk_of(kv, i))
        with stream.leased_views(stream.keys([t + 1 for t in toks])) as lv:
            assert lv.matched == 0


def test_disk_chunks_are_promoted_and_leased(daemon_factory):
    d = daemon_factory()
    toks = list(range(64 * 2))
    kv = kv_for(len(toks), 3)
    from kvstore_wire.types import Durability

    with KVStoreClient(d.addr, Namespace(**NS)) as c:
        c.store(toks, kv, durability=Durability.PERSISTED)
    d.restart()
    with KVStoreClient(d.addr, Namespace(**NS)) as c:
        with c.leased_views(c.keys(toks)) as lv:
            assert lv.matched == 2
            assert all(np.array_equal(ch.data, chunk_of(kv, i)) for i, ch in enumerate(lv.chunks))


def test_async_client_leases_views_too(daemon):
    toks = list(range(20000, 20000 + 64 * 2))
    kv = kv_for(len(toks), 4)

    async def main() -> None:
        c = await AsyncKVStoreClient.connect(daemon.addr, Namespace(**NS))
        async with c:
            assert await c.store(toks, kv) == 2
            async with c.leased_views(c.keys(toks)) as lv:
                assert lv.matched == 2 and all(ch.leased for ch in lv.chunks)
                assert all(np.array_equal(ch.data, chunk_of(kv, i)) for i, ch in enumerate(lv.chunks))

    asyncio.run(main())


def test_a_corrupt_arena_chunk_fails_verification_and_nothing_stays_leased(daemon):
    """With ``verify_crc=True`` the client checks each extent itself: bytes flipped in the
    shared arena after the daemon granted the lease are ``DataLoss``, not wrong KV."""
    from kvstore_client import _views

    toks = list(range(30000, 30000 + 64))
    with KVStoreClient(daemon.addr, Namespace(**NS)) as c:
        c.store(toks, kv_for(64, 5))
        real = _views._prepare

        def flip(ns, items, verify, pool, last_tokens=0):
            view = items[0][0]
            saved = int(view[10])
            view[10] = saved ^ 0xFF
            try:
                return real(ns, items, verify, pool, last_tokens)
            finally:
                view[10] = saved

        _views._prepare = flip
        try:
            with pytest.raises(DataLoss, match="CRC32C"):
                with c.leased_views(c.keys(toks), verify_crc=True):
                    pass
        finally:
            _views._prepare = real
        with c.leased_views(c.keys(toks), verify_crc=True) as lv:
            assert lv.matched == 1
