"""Trailing partial chunks (``include_partial``) against a real daemon: stored after the full
chunks under a key of their own, matched only by the very same tokens, loaded back bit-exact
through every read path (arena leases, leased views, the Get stream, the async client)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kvstore_client import AsyncKVStoreClient, KVStoreClient, Namespace
from kvstore_client.errors import DataLoss
from kvstore_wire._proto.kvstore.v1 import local_pb2
from kvstore_wire.types import Encoding, KeyKind

C = 64
NS = dict(model="partial-chunks-test", dtype="float16", num_layers=3, num_kv_heads=2, head_dim=32, chunk_tokens=C)


def kv_for(tokens: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, 2, tokens, 2, 32)).astype(np.float16)


def _raw(kv: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.ascontiguousarray(kv[:, :, lo:hi]).view(np.uint8).reshape(-1)


@pytest.mark.parametrize("local", [None, False], ids=["shm", "stream"])
def test_tail_is_stored_matched_and_read_back_exactly(daemon, local):
    base = 20_000 if local is None else 30_000
    toks = list(range(base, base + 3 * C + 17))            # 3 full chunks + 17 tokens
    kv = kv_for(len(toks) + 5, 1)                          # kv may hold more tokens than asked for
    with KVStoreClient(daemon.addr, Namespace(**NS), local=local) as c:
        assert c.tail_tokens(toks) == 17
        assert len(c.keys(toks, include_partial=True)) == 4 and c.keys(toks, include_partial=True)[:3] == c.keys(toks)
        assert c.store(toks, kv) == 3                      # full chunks only, by default
        assert c.lookup(toks, include_partial=True).matched_tokens == 3 * C
        assert c.store(toks, kv, include_partial=True) == 1    # the tail alone is new
        assert c.store(toks, kv, include_partial=True) == 0
        hit = c.lookup(toks, include_partial=True)
        assert (hit.matched_tokens, hit.matched_chunks) == (len(toks), 4)
        assert c.lookup(toks).matched_tokens == 3 * C      # without the flag: whole chunks
        # The tail's key hashes its tokens: another last token, or one token more, misses it.
        assert c.lookup(toks[:-1] + [7], include_partial=True).matched_tokens == 3 * C
        assert c.lookup(toks + [7], include_partial=True).matched_tokens == 3 * C
        n, got = c.retrieve(toks, include_partial=True)
        assert n == len(toks) and got.shape == (3, 2, len(toks), 2, 32)
        assert np.array_equal(got, kv[:, :, :len(toks)])
        n, got = c.retrieve(toks)
        assert n == 3 * C and np.array_equal(got, kv[:, :, :3 * C])
        keys = c.keys(toks, include_partial=True)
        with c.leased_views(keys, last_tokens=17) as lv:
            assert lv.matched == 4 and lv.matched_tokens == len(toks)
            assert [lv.tokens_of(ch) for ch in lv.chunks] == [C, C, C, 17]
            assert lv.chunks[-1].leased == (local is None)
            for i, ch in enumerate(lv.chunks):
                assert np.array_equal(ch.data, _raw(kv, i * C, min((i + 1) * C, len(toks))))
        # The full chunks' views never accept a partial chunk in their place: asked as full,
        # the tail (17 tokens) is refused, whatever the daemon holds under that key.
        with pytest.raises(DataLoss, match="expected 64 tokens"):
            with c.leased_views(keys):
                pass


def test_tail_after_a_missing_full_chunk_is_not_matched_nor_loaded(daemon):
    toks = list(range(40_000, 40_000 + 2 * C + 9))
    kv = kv_for(len(toks), 2)
    with KVStoreClient(daemon.addr, Namespace(**NS)) as c:
        assert c.store(toks, kv, include_partial=True) == 3
        keys = c.keys(toks, include_partial=True)
        assert c.delete([keys[1]]) == 1
        assert c.lookup(toks, include_partial=True).matched_tokens == C
        n, got = c.retrieve(toks, include_partial=True)
        assert n == C and np.array_equal(got, kv[:, :, :C])
        with c.leased_views(keys, last_tokens=9) as lv:
            assert lv.matched == 1 and lv.matched_tokens == C


def test_only_tokens_the_kv_covers_are_stored(daemon):
    toks = list(range(50_000, 50_000 + C + 30))
    with KVStoreClient(daemon.addr, Namespace(**NS)) as c:
        assert c.store(toks, kv_for(C + 10, 3), include_partial=True) == 1    # kv ends inside the tail
        assert c.lookup(toks, include_partial=True).matched_tokens == C
        exact = list(range(60_000, 60_000 + 2 * C))
        assert c.store(exact, kv_for(2 * C, 4), include_partial=True) == 2    # no tail to store
        assert c.lookup(exact, include_partial=True).matched_tokens == 2 * C


def test_a_partial_chunk_stored_under_a_full_key_is_refused_on_read(daemon):
    """A writer of the namespace that puts a short chunk under a full chunk's key (the daemon
    cannot tell keys apart) gets DataLoss on every read path, never misplaced tokens."""
    toks = list(range(70_000, 70_000 + 2 * C))
    with KVStoreClient(daemon.addr, Namespace(**NS)) as c:
        key = c.keys(toks)[0]
        short = _raw(kv_for(10, 5), 0, 10)
        resp = c._reserve(local_pb2.ReserveWriteRequest(namespace_id=c.namespace_id, chunks=[
            local_pb2.ChunkToWrite(key=key, key_kind=KeyKind.PREFIX, num_tokens=10, encoding=Encoding.RAW,
                                   payload_bytes=short.nbytes)]), metadata=c._metadata)
        s = resp.slots[0]
        c.arena.view(s.offset, s.length)[:] = short
        from kvstore_wire.crc import crc32c
        c._rpc["commit"](local_pb2.CommitWriteRequest(lease_id=resp.lease_id, crc32c=[crc32c(short)]),
                         metadata=c._metadata)
        with pytest.raises(DataLoss):
            c.retrieve(toks)
        with pytest.raises(DataLoss):
            with c.leased_views(c.keys(toks)):
                pass
    with KVStoreClient(daemon.addr, Namespace(**NS), local=False) as s:
        with pytest.raises(DataLoss):
            s.retrieve(toks)


def test_async_client_stores_and_reads_the_tail(daemon):
    toks = list(range(80_000, 80_000 + C + 5))
    kv = kv_for(len(toks), 6)

    async def main():
        c = await AsyncKVStoreClient.connect(daemon.addr, Namespace(**NS))
        async with c:
            assert await c.store(toks, kv, include_partial=True) == 2
            assert (await c.lookup(toks, include_partial=True)).matched_tokens == len(toks)
            n, got = await c.retrieve(toks, include_partial=True)
            assert n == len(toks) and np.array_equal(got, kv)
            async with c.leased_views(c.keys(toks, include_partial=True), last_tokens=5) as lv:
                assert lv.matched_tokens == len(toks)

    asyncio.run(main())


@pytest.mark.parametrize("codec,lossy", [("near-lossless", True), ("lossless", False)])
def test_views_say_which_chunks_came_lossy(daemon_factory, codec, lossy):
    """A DRAM tier with a codec stores bitstreams; the views of a lossy level's chunks (the
    partial one too) are marked ``lossy``, on the arena and the stream path alike."""
    d = daemon_factory(settings=(f'dram.codec="{codec}"',))
    toks = list(range(90_000, 90_000 + C + 11))
    kv = kv_for(len(toks), 7)
    for local in (None, False):
        with KVStoreClient(d.addr, Namespace(**NS), local=local) as c:
            c.store(toks, kv, include_partial=True)
            with c.leased_views(c.keys(toks, include_partial=True), last_tokens=11) as lv:
                assert lv.matched_tokens == len(toks)
                assert [ch.lossy for ch in lv.chunks] == [lossy, lossy]
                got = np.concatenate([np.frombuffer(ch.data, np.float16).reshape(3, 2, -1, 2, 32)
                                      for ch in lv.chunks], axis=2)
                assert np.array_equal(got, kv) != lossy
