"""The transformers adapter on replica B, with the prompt's prefix stored through replica A
into a shared Redis Cluster: greedy output equals the cold run and the shared chunks are not
prefilled on B."""

from __future__ import annotations

import uuid
from contextlib import ExitStack

import pytest

from kvstore_client import Tier
from kvstore_client.client import KVStoreClient
from kvstore_client.engines.transformers import KVCacheAdapter, namespace_for
from kvstore_testing.redis_cluster import LocalRedisCluster, available

from remote.replicas import HIT_TIMEOUT_MS, TOK_X, replica, uploads, wait_uploaded  # tests/ is on sys.path
from .conftest import CHUNK_TOKENS, NEW_TOKENS

pytestmark = [pytest.mark.model, pytest.mark.redis]


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    if not available():
        pytest.skip("redis-server / redis-cli not installed")
    tmp = tmp_path_factory.mktemp("tf-replicas")
    with ExitStack() as st:
        cluster = LocalRedisCluster(tmp / "redis").start()
        st.callback(cluster.stop)
        a = st.enter_context(replica(cluster, tmp, "a", timeout_ms=HIT_TIMEOUT_MS))
        b = st.enter_context(replica(cluster, tmp, "b", timeout_ms=HIT_TIMEOUT_MS))
        yield a, b


def test_prefix_from_replica_a_skips_prefill_on_replica_b(lm, prompt, cold, two_replicas):
    """Same-host clients on both (B's presence index says "a miss is not final", so B's lookup
    goes to the daemon, which fills it from the cluster); tests/remote/test_daemons.py covers
    the stream path."""
    a, b = two_replicas
    local = None
    ns = namespace_for(lm.model, chunk_tokens=CHUNK_TOKENS, model_id=f"{lm.model_id}#remote-{uuid.uuid4().hex[:8]}")
    before = uploads(a)
    with KVCacheAdapter(lm.model, KVStoreClient(a.addr, ns, token=TOK_X, local=local)) as on_a:
        first = on_a.generate(prompt, max_new_tokens=NEW_TOKENS)
        on_a.flush()
    assert first.matched_tokens == 0 and first.tokens == cold.tokens
    shared = len(prompt) // CHUNK_TOKENS
    wait_uploaded(a, shared, before)

    with KVCacheAdapter(lm.model, KVStoreClient(b.addr, ns, token=TOK_X, local=local)) as on_b:
        hit = on_b.generate(prompt, max_new_tokens=NEW_TOKENS)
    reusable = (len(prompt) - 1) // CHUNK_TOKENS * CHUNK_TOKENS
    assert hit.matched_tokens == reusable == 512           # prefill skipped for the shared chunks
    assert hit.prefilled_tokens == len(prompt) - reusable
    assert hit.tiers == (Tier.DRAM,) * (reusable // CHUNK_TOKENS)   # promoted into B's DRAM first
    assert hit.tokens == cold.tokens                       # greedy output equals the cold run
