"""Two replicas' remote parts on one cluster: what A uploads, B fetches (bit-exact at the
lossless level); another tenant on B never hits; an unknown namespace still uploads (RAW)."""

from __future__ import annotations

import numpy as np

import kvstore_native as native
from kvstore.config import TierCodec
from kvstore.errors import NotFound
from kvstore_testing.codec_data import synthetic_kv
from kvstore.tiers.remote import build_remote
from kvstore.types import ChunkId, ChunkMeta, DType, Encoding
from kvstore_wire.keys import Namespace, next_prefix_key, root_key

from .conftest import remote_config, ready

TOKENS = 64


def _ns(tenant):
    return Namespace("synthetic", DType.FLOAT16, 4, 3, 64, chunk_tokens=TOKENS, tenant=tenant)


def _prefix(ns: Namespace, n: int, seed: int):
    """n chunks of a prefix chain (real chained keys over token ids) with KV-like data."""
    rng = np.random.default_rng(seed)
    key, out = root_key(ns.namespace_id), []
    for i in range(n):
        key = next_prefix_key(key, rng.integers(0, 50_000, TOKENS).tolist())
        arr = synthetic_kv(layers=4, tokens=TOKENS, heads=3, head_dim=64, seed=seed * 100 + i)
        out.append((ChunkId(ns.namespace_id + key), ChunkMeta(TOKENS, Encoding.RAW, arr.nbytes, native.crc32c(arr)),
                    arr))
    return out


def test_prefix_from_replica_a_is_a_bit_exact_hit_on_replica_b(redis_cluster):
    x, y = _ns("tenant-x"), _ns("tenant-y")
    registry = {x.namespace_id: x, y.namespace_id: y}
    cfg = remote_config(redis_cluster, min_quality=TierCodec.LOSSLESS)

    def resolve(ns_id):
        try:
            return registry[ns_id]
        except KeyError:
            raise NotFound("unknown namespace") from None

    a = ready(build_remote(cfg, resolve=resolve, tenant_of=lambda n: resolve(n).tenant))
    b = ready(build_remote(cfg, resolve=resolve, tenant_of=lambda n: resolve(n).tenant))
    try:
        chunks = _prefix(x, 4, seed=5)
        for c in chunks[:3]:
            a.uploader.submit(*c)
        assert a.uploader.flush(60)
        got = b.reader.fetch_prefix([c[0] for c in chunks], num_tokens=TOKENS)
        assert [f.cid for f in got] == [c[0] for c in chunks[:3]]
        for f, (_, meta, arr) in zip(got, chunks):
            assert f.level == TierCodec.LOSSLESS and f.meta.encoding == Encoding.RAW
            assert bytes(f.payload) == arr.tobytes() and f.meta.crc32c == meta.crc32c
        # Tenant Y sends the very same token ids on replica B: other namespace, other keys.
        same_keys_y = [ChunkId(y.namespace_id + c[0][32:]) for c in chunks]
        assert b.reader.fetch_prefix(same_keys_y, num_tokens=TOKENS) == []
        # A namespace the registry does not know still uploads, as given.
        stranger = ChunkId(bytes(32) + bytes(range(32)))
        arr = chunks[0][2]
        a.uploader.submit(stranger, chunks[0][1], arr)
        assert a.uploader.flush(60)
        v, = b.tier.get_values([stranger])
        assert v.level is None and bytes(v.payload) == arr.tobytes()
        assert a.uploader.stats().encode_errors == 1
    finally:
        a.close()
        b.close()
