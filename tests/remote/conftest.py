"""Fixtures for the remote tier: a real Redis Cluster (3 masters, 1 replica each) on loopback.

``redis_cluster`` is session-scoped and must stay healthy (non-destructive tests);
``fresh_cluster`` is a private cluster per test for the fault tests that kill and pause
nodes. Both are skipped cleanly when redis-server is not installed.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import kvstore_native as native
from kvstore.config import RemoteConfig
from kvstore_testing.redis_cluster import LocalRedisCluster, available
from kvstore.tiers.remote import RemoteTier
from kvstore.types import ChunkId, ChunkMeta, Encoding



def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/remote/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.redis)

#: Deadline of remote calls in the tests: long enough for a loaded 2-core CI box, short
#: enough that a fault test waiting on it stays quick.
TEST_TIMEOUT_MS = 500


#: SmolLM2-135M KV geometry [layers, K/V, tokens, kv_heads, head_dim], float16.
SMOLLM2_SHAPE = (30, 2, 16, 3, 64)


def make_chunk(rng: np.random.Generator, ns: bytes, tokens: int = 16):
    """(cid, meta, payload) with a random key under namespace ``ns``; KV-shaped float16."""
    shape = (SMOLLM2_SHAPE[0], 2, tokens, SMOLLM2_SHAPE[3], SMOLLM2_SHAPE[4])
    payload = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
    return ChunkId(ns + rng.bytes(32)), ChunkMeta(tokens, Encoding.RAW, payload.nbytes, native.crc32c(payload)), payload


def remote_config(cluster, **kw) -> RemoteConfig:
    base = dict(enabled=True, nodes=cluster.nodes, timeout_ms=TEST_TIMEOUT_MS, retry_backoff_s=0.2,
                key_secret="test-secret-0123456789", ttl_s=3600)
    base.update(kw)
    return RemoteConfig(**base)


def ready(x):
    """A RemoteTier or RemoteParts whose link has connected (a fresh link connects in the
    background; on a loaded box that can take longer than one test deadline)."""
    tier = getattr(x, "tier", x)
    assert tier.link.wait_ready(30), "the Redis Cluster client did not connect"
    return x


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    if not available():
        pytest.skip("redis-server / redis-cli not installed")
    c = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield c
    c.stop()


@pytest.fixture
def fresh_cluster(tmp_path):
    if not available():
        pytest.skip("redis-server / redis-cli not installed")
    c = LocalRedisCluster(tmp_path / "redis").start()
    yield c
    c.stop()


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def ns(rng) -> bytes:
    """A namespace id of this test only (tests share the session cluster)."""
    return rng.bytes(32)


@pytest.fixture
def remote(redis_cluster):
    tier = ready(RemoteTier(remote_config(redis_cluster)))
    yield tier
    tier.close()
