"""Store, look up and retrieve KV chunks with the sync and the async client (numpy only).

    kvstore serve --data-dir /tmp/kvstore-data &          # a daemon on 127.0.0.1:50051
    python examples/client_basics.py [ADDR]

Needs only ``pip install ./wire ./client``; see docs/client.md.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np

from kvstore_client import AsyncKVStoreClient, KVStoreClient, Namespace

NS = Namespace(model="example/tiny-llama", dtype="float16", num_layers=4, num_kv_heads=2, head_dim=64,
               chunk_tokens=256)


def sync_demo(addr: str, tokens: list[int], kv: np.ndarray) -> None:
    with KVStoreClient(addr, NS) as c:
        covered = c.storable_tokens(tokens, kv)      # whole chunks only: 512 of 600 tokens
        new = c.store(tokens, kv)
        hit = c.lookup(tokens)
        n, out = c.retrieve(tokens)
        assert n == covered and np.array_equal(out, kv[:, :, :n])
        buf = np.empty(NS.chunk_shape(covered), np.float16)
        assert c.retrieve_into(tokens[:covered], buf) == covered and np.array_equal(buf, out)
        print(f"sync  [{c.transport}, CRC32C {c.crc_backend}]: {new} new chunks, {covered} of {len(tokens)} "
              f"tokens stored, lookup {hit.matched_tokens} tokens in {[t.name for t in hit.tiers]}")


async def async_demo(addr: str, tokens: list[int], kv: np.ndarray) -> None:
    async with await AsyncKVStoreClient.connect(addr, NS) as c:
        await c.store(tokens, kv)
        buf = np.empty(NS.chunk_shape(c.storable_tokens(tokens, kv)), np.float16)
        n = await c.retrieve_into(tokens[:buf.shape[2]], buf)
        assert np.array_equal(buf, kv[:, :, :n])
        print(f"async [{c.transport}]: retrieved {n} tokens into the caller's buffer")


def main(addr: str = "127.0.0.1:50051") -> None:
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(0, 32000, 600)]
    kv = rng.standard_normal(NS.chunk_shape(len(tokens))).astype(np.float16)
    sync_demo(addr, tokens, kv)
    asyncio.run(async_demo(addr, tokens, kv))


if __name__ == "__main__":
    main(*sys.argv[1:])
