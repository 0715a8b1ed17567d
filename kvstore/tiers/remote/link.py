"""One Redis Cluster connection for the whole process: redis-py's asyncio cluster client on a
private event-loop thread, every call under a hard deadline.

Why asyncio and not the sync ``RedisCluster``: (1) a deadline must bound everything a call
does (connect, MOVED/ASK redirects, retries, cluster-map refresh); ``asyncio.wait_for``
cancels all of it, while the sync client only bounds each socket operation, so retries
multiply the time; (2) the async ``ClusterPipeline`` sends each node's commands
concurrently, so a cross-slot existence check is one round trip, not one per node; (3) a
batch GET runs concurrently on one thread without a thread per request.

Threading: ``run`` may be called from any thread except the link's own loop thread; it
blocks the caller for at most the deadline plus ``_JOIN_SLACK_S``. Failures are translated
here, once: a call raises ``Unavailable`` (Redis down, refused, cluster error, or backing
off) or ``DeadlineExceeded``; nothing else escapes except programming errors.

Backoff: after a failure the link fails fast (``Unavailable``) for ``retry_backoff_s``, so a
dead cluster costs the engine nothing per request instead of one deadline each; the first
call after the window probes again. After ``_RESET_AFTER_FAILURES`` failures in a row the
client is thrown away and rebuilt from the seed nodes (a full outage can leave redis-py
with a stale slot map).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Awaitable, Callable, TypeVar

from redis import exceptions as rx
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from ...config import RemoteConfig
from ...errors import DeadlineExceeded, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Extra wait (s) of the calling thread beyond the deadline enforced inside the loop, so the
#: loop's own cancellation normally wins and the connection state is cleaned up there.
_JOIN_SLACK_S = 0.05
#: Consecutive failures after which the cluster client is rebuilt from the seed nodes.
_RESET_AFTER_FAILURES = 3
#: Errors that mean "remote not usable right now" (everything redis-py raises, plus the
#: OS-level ones its connection layer may let through).
#: Seconds ``close`` waits for the client to disconnect and the loop thread to end.
_CLOSE_WAIT_S = 2.0
#: Longest a (background, shared) connect to the cluster may take before it is retried by
#: the next request: discovering the slot map and dialling every node.
CONNECT_DEADLINE_S = 5.0
_REMOTE_ERRORS = (rx.RedisError, rx.RedisClusterException, OSError, asyncio.TimeoutError)
#: redis-py's own retries of a failed command (MOVED/ASK and reconnects during a failover):
#: two, 5..50 ms apart; the deadline still bounds the whole call.
_RETRIES = 2
_RETRY_BACKOFF = dict(cap=0.05, base=0.005)


def _map_of(table: dict[str, str]) -> Callable[[tuple[str, int]], tuple[str, int]] | None:
    """``remote.address_map`` ("host:port" -> "host:port") as redis-py's ``address_remap``."""
    if not table:
        return None
    pairs = {}
    for src, dst in table.items():
        (sh, _, sp), (dh, _, dp) = src.rpartition(":"), dst.rpartition(":")
        pairs[(sh, int(sp))] = (dh, int(dp))

    def remap(addr: tuple[str, int]) -> tuple[str, int]:
        return pairs.get((addr[0], int(addr[1])), addr)
    return remap


class RedisLink:
    def __init__(self, cfg: RemoteConfig, clock: Callable[[], float] = time.monotonic,
                 address_remap: Callable[[tuple[str, int]], tuple[str, int]] | None = None) -> None:
        """``address_remap`` rewrites the node addresses of the slot map (NAT, or the test
        harness's throttling proxy)."""
        self.cfg = cfg
        self._remap = address_remap or _map_of(cfg.address_map)
        self._clock = clock
        self.timeout_s = cfg.timeout_ms / 1000.0
        self._client: RedisCluster | None = None
        self._connect_task: asyncio.Task | None = None
        self._failures = 0
        self._backoff_until = 0.0
        self._closed = False
        self._count_lock = threading.Lock()  # guards the counters below (a leaf lock)
        self.errors = 0            # calls that failed (Unavailable or DeadlineExceeded)
        self.fast_fails = 0        # of those, refused at once during backoff
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvstore-redis", daemon=True)
        self._thread.start()
        # Connect in the background now, so the first request does not pay for it.
        self._loop.call_soon_threadsafe(self._start_connect)

    # -- public -------------------------------------------------------------------------
    def run(self, fn: Callable[[RedisCluster], Awaitable[T]], what: str, timeout_s: float | None = None) -> T:
        """Runs ``fn(client)`` on the loop; returns its result within the deadline or raises."""
        if self._closed:
            raise Unavailable("the remote tier is closed")
        if self._clock() < self._backoff_until:
            with self._count_lock:
                self.errors += 1
                self.fast_fails += 1
            raise Unavailable(f"remote {what}: Redis failed recently; backing off")
        deadline = self.timeout_s if timeout_s is None else timeout_s
        fut = asyncio.run_coroutine_threadsafe(self._guarded(fn, deadline), self._loop)
        try:
            result = fut.result(deadline + _JOIN_SLACK_S)
        except (concurrent.futures.TimeoutError, asyncio.TimeoutError):  # ours, or wait_for's in the loop
            fut.cancel()
            self._failed()
            raise DeadlineExceeded(f"remote {what} took longer than {deadline * 1000:.0f} ms") from None
        except _REMOTE_ERRORS as e:
            self._failed()
            raise Unavailable(f"remote {what} failed: {type(e).__name__}: {e}") from None
        self._failures = 0
        return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(_CLOSE_WAIT_S)
        except (concurrent.futures.TimeoutError, *_REMOTE_ERRORS) as e:
            log.debug("closing the Redis client: %s", e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_CLOSE_WAIT_S)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self) -> None:
        task = self._connect_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._drop()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def wait_ready(self, timeout_s: float) -> bool:
        """Waits until the cluster client is connected (start-up, tests); False on timeout
        or failure. Requests never need this: they connect on demand within their deadline."""
        async def probe():
            await self._get_client()
        try:
            asyncio.run_coroutine_threadsafe(asyncio.wait_for(probe(), timeout_s), self._loop).result(timeout_s + 1)
            return True
        except (concurrent.futures.TimeoutError, *_REMOTE_ERRORS):
            return False

    def count_errors(self, n: int) -> None:
        """Errors of parts of a call that itself succeeded (a batch's stragglers)."""
        with self._count_lock:
            self.errors += n

    # -- loop side ----------------------------------------------------------------------
    def _failed(self) -> None:
        with self._count_lock:
            self.errors += 1
            self._failures += 1
        self._backoff_until = self._clock() + self.cfg.retry_backoff_s
        if self._failures >= _RESET_AFTER_FAILURES and not self._closed:
            self._failures = 0
            asyncio.run_coroutine_threadsafe(self._drop(), self._loop)

    async def _guarded(self, fn, deadline: float):
        async def body():
            client = await self._get_client()
            return await fn(client)
        return await asyncio.wait_for(body(), deadline)

    async def _get_client(self) -> RedisCluster:
        if self._client is not None:
            return self._client
        task = self._connect_task
        if task is None or (task.done() and self._client is None):
            task = self._start_connect()
        # Shielded: a request whose deadline ends cancels its wait, not the connect, so the
        # next request finds the client ready instead of starting over.
        await asyncio.shield(task)
        return self._client

    def _start_connect(self) -> asyncio.Task:
        self._connect_task = asyncio.ensure_future(self._connect())
        self._connect_task.add_done_callback(_retrieve)
        return self._connect_task

    async def _connect(self) -> None:
        client = self._build()
        try:
            await asyncio.wait_for(client.initialize(), max(self.timeout_s, CONNECT_DEADLINE_S))
        except BaseException:
            await _quiet_close(client)
            raise
        self._client = client
        log.info("connected to the Redis Cluster at %s", ", ".join(self.cfg.nodes))

    def _build(self) -> RedisCluster:
        c = self.cfg
        nodes = [ClusterNode(h, int(p)) for h, _, p in (n.rpartition(":") for n in c.nodes)]
        tls = {}
        if c.tls:
            tls = dict(ssl=True, ssl_ca_certs=_str(c.tls_ca_file), ssl_certfile=_str(c.tls_cert_file),
                       ssl_keyfile=_str(c.tls_key_file))
        return RedisCluster(
            startup_nodes=nodes, username=c.username or None, password=c.password or None,
            max_connections=c.max_connections_per_node,
            # The deadline is enforced by wait_for; socket timeouts only stop a single
            # read from outliving it when the loop is busy.
            socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
            # Slots move during a failover; a partial map still serves the healthy nodes.
            address_remap=self._remap,
            require_full_coverage=False, retry=Retry(ExponentialBackoff(**_RETRY_BACKOFF), _RETRIES),
            **tls)

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await _quiet_close(client)


async def _quiet_close(client: RedisCluster) -> None:
    try:
        await client.aclose()
    except _REMOTE_ERRORS as e:
        log.debug("closing a failed Redis client: %s", e)


def _retrieve(task: asyncio.Task) -> None:
    """Marks a background connect's failure as seen (the requests that wait on it get it)."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("connecting to the Redis Cluster failed: %s", task.exception())


def _str(p) -> str | None:
    return None if p is None else str(p)
