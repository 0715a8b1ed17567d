"""The throttled link between the replicas and the Redis Cluster for ``bench/remote_ttft.py``.

Preferred: ``NetnsLink``, the cluster inside a network namespace behind a veth pair with a
``tbf`` qdisc on each end (``kvstore_testing.netns``): the kernel paces every byte between
the daemons (root namespace) and Redis, both directions, and the rate is checked by a raw
TCP transfer through the same pair (``ceiling_bits_per_s``). Fallback, where namespaces
cannot be made (not root, no ``tc``; CI): ``ProxyLink``, the harness's rate-limiting TCP
proxy in front of every node (``kvstore_testing.throttle``), whose ceiling is a raw redis-py
GET through it. ``open_link`` picks and says which and why.

Both end everything they started on exit (``ExitStack`` callbacks: Ctrl-C and SIGTERM unwind
through them; the namespace also has an ``atexit`` hook).
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import ExitStack
from pathlib import Path

from kvstore_testing import netns
from kvstore_testing.redis_cluster import LocalRedisCluster
from kvstore_testing.throttle import ThrottledCluster

#: Bytes of the raw ceiling transfer: about this many seconds at the rate (min 32 MiB).
_CEILING_S = 0.5
_CEILING_MIN_BYTES = 32 << 20
#: Raw redis-py GETs per measurement: like a 4096-token lossless prefix (16 x 5 MB).
RAW_GET_VALUES, RAW_GET_BYTES = 16, 5 << 20


class NetnsLink:
    kind = "tc tbf on a veth pair into a network namespace holding the cluster"

    def __init__(self, st: ExitStack, root: Path) -> None:
        self._ns = netns.ThrottledNetns()
        st.callback(self._ns.close)
        self.cluster = LocalRedisCluster(root, host=self._ns.inner_ip, wrap=self._ns.wrap).start()
        st.callback(self.cluster.stop)  # runs before the namespace goes (LIFO)
        self.settings: list[str] = []

    def set_rate(self, bits_per_s: float) -> None:
        self._ns.set_rate(bits_per_s)

    def raw_get_bits_per_s(self) -> float:
        return raw_get_bits_per_s(self.cluster.nodes)

    def ceiling_bits_per_s(self, bits_per_s: float) -> float:
        return self._ns.measure_bits_per_s(max(_CEILING_MIN_BYTES, int(bits_per_s / 8 * _CEILING_S)))


class ProxyLink:
    kind = "the harness's rate-limiting TCP proxy (kvstore_testing.throttle)"

    def __init__(self, st: ExitStack, root: Path) -> None:
        self.cluster = LocalRedisCluster(root).start()
        st.callback(self.cluster.stop)
        self._proxy = ThrottledCluster(self.cluster, 1e9)
        st.callback(self._proxy.close)
        self.settings = ["remote.nodes=[" + ", ".join(f'"{n}"' for n in self._proxy.nodes) + "]",
                         "remote.address_map={" + ", ".join(
                             f'"{r}" = "{p}"' for r, p in zip(self.cluster.nodes, self._proxy.nodes)) + "}"]
        self.nodes = self._proxy.nodes

    def set_rate(self, bits_per_s: float) -> None:
        self._proxy.rate = bits_per_s / 8

    def raw_get_bits_per_s(self) -> float:
        return raw_get_bits_per_s(self.nodes, self._proxy.remap)

    def ceiling_bits_per_s(self, bits_per_s: float) -> float:
        return raw_get_bits_per_s(self.nodes, self._proxy.remap, values=1,
                                  nbytes=max(_CEILING_MIN_BYTES, int(bits_per_s / 8 * _CEILING_S)))


def open_link(st: ExitStack, root: Path, force_proxy: bool = False):
    """The namespace link when possible, else the proxy; prints which and why."""
    if not force_proxy:
        try:
            link = NetnsLink(st, root)
            print(f"link: {link.kind}", flush=True)
            return link
        except netns.NetnsUnavailable as e:
            print(f"link: network namespace / tc unavailable ({e}); falling back to the proxy", flush=True)
    link = ProxyLink(st, root)
    print(f"link: {link.kind}", flush=True)
    return link


def raw_get_bits_per_s(nodes: list[str], remap=None, values: int = RAW_GET_VALUES,
                       nbytes: int = RAW_GET_BYTES, reps: int = 3) -> float:
    """Concurrent raw redis-py GETs of ``values`` values of ``nbytes`` (written first, deleted
    after) through the link: what the client library can pull over it; median of ``reps``."""
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    async def run() -> float:
        c = RedisCluster(startup_nodes=[ClusterNode(h, int(p)) for h, _, p in (n.rpartition(":") for n in nodes)],
                         address_remap=remap)
        await c.initialize()
        keys = [f"bench:raw:{os.getpid()}:{i}".encode() for i in range(values)]
        blob = os.urandom(nbytes)
        try:
            for k in keys:
                await c.set(k, blob)
            await asyncio.gather(*(c.get(k) for k in keys))  # warm: a connection per node
            rates = []
            for _ in range(reps):
                t0 = time.perf_counter()
                got = await asyncio.gather(*(c.get(k) for k in keys))
                rates.append(sum(map(len, got)) * 8 / (time.perf_counter() - t0))
            return sorted(rates)[len(rates) // 2]
        finally:
            for k in keys:
                await c.delete(k)
            await c.aclose()
    return asyncio.run(run())
