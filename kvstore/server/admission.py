"""Admission control for streams: the in-flight byte budgets and a cap on open streams
(docs/security.md, "Admission control"). The per-stream idle deadline is the interceptor's
(``status.RequestInterceptor``, ``quotas.max_stream_idle_s``): one deadline per stream.

``InflightBudget`` counts request bytes the daemon holds in memory but has not stored yet
(Put data as it arrives), per tenant against ``quotas.max_inflight_request_bytes`` (through the
quota ledger: over it, RESOURCE_EXHAUSTED at once) and daemon-wide against
``quotas.daemon_max_inflight_request_bytes``. Nothing is allocated from an announced length:
bytes are counted when they have arrived, so a header-only stream costs nothing, and a stream
over the daemon-wide budget stops reading (gRPC flow control then stops its sender) for at
most ``wait_s`` (``server.inflight_wait_s``) before it is refused with RESOURCE_EXHAUSTED.

``StreamGate`` caps the Put and Get streams open at once daemon-wide
(``server.max_concurrent_streams``; per tenant: ``quotas.max_concurrent_streams``, counted by
the interceptor); one more is refused at once.

Threading: event-loop thread only (no locks of its own; the ledger is thread-safe); every
method is non-blocking or a coroutine.
"""

from __future__ import annotations

import asyncio
from collections import deque

from ..domain.errors import InvalidArgument, ResourceExhausted
from ..quotas import DAEMON_INFLIGHT_KEY, QuotaLedger, Resource

_KEY = f"quotas.{DAEMON_INFLIGHT_KEY}"


class InflightBudget:
    """Bytes held by requests in flight, per tenant (``ledger``, when given) and daemon-wide.
    Waiters for the daemon-wide budget are served first come, first served, so a large request
    is not starved by a stream of small ones."""

    def __init__(self, limit_bytes: int, wait_s: float, ledger: QuotaLedger | None = None) -> None:
        if limit_bytes <= 0:
            raise InvalidArgument(f"{_KEY} must be positive")
        self._limit = limit_bytes
        self._wait_s = wait_s
        self._ledger = ledger
        self._used = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def limit_bytes(self) -> int:
        return self._limit

    async def acquire(self, n: int, tenant: str | None = None) -> None:
        """Counts ``n`` bytes of ``tenant`` (None: no per-tenant quota), waiting up to
        ``wait_s`` for daemon-wide room. ResourceExhausted naming the tenant's quota at once
        when it is over it, or naming ``quotas.daemon_max_inflight_request_bytes`` when there
        is no daemon-wide room in time (nothing is counted then)."""
        if n > self._limit:
            raise ResourceExhausted(f"a request of {n} bytes exceeds the daemon's in-flight budget "
                                    f"({_KEY}={self._limit}); send smaller chunks")
        if tenant is not None and self._ledger is not None:
            self._ledger.acquire(tenant, Resource.INFLIGHT_REQUEST_BYTES, n)
        try:
            await self._acquire_daemon(n)
        except BaseException:
            if tenant is not None and self._ledger is not None:
                self._ledger.release(tenant, Resource.INFLIGHT_REQUEST_BYTES, n)
            raise

    async def _acquire_daemon(self, n: int) -> None:
        if not self._waiters and self._used + n <= self._limit:
            self._used += n
            return
        fut = asyncio.get_running_loop().create_future()
        item = (n, fut)
        self._waiters.append(item)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self._wait_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            if fut.done() and not fut.cancelled():   # granted just as we gave up: give it back
                self.release(n)
            else:
                fut.cancel()
                self._waiters.remove(item)
                self._grant()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise ResourceExhausted(
                f"the daemon holds {self._used} of its {_KEY}={self._limit} bytes of requests "
                f"in flight (all tenants) and none were freed within server.inflight_wait_s={self._wait_s:g} s; "
                f"retry later, or raise {_KEY}") from None

    def release(self, n: int, tenant: str | None = None) -> None:
        if tenant is not None and self._ledger is not None:
            self._ledger.release(tenant, Resource.INFLIGHT_REQUEST_BYTES, n)
        self._used -= n
        assert self._used >= 0, "in-flight bytes released twice"
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._used + self._waiters[0][0] <= self._limit:
            n, fut = self._waiters.popleft()
            if not fut.done():
                self._used += n
                fut.set_result(None)


class StreamGate:
    """At most ``limit`` Put/Get streams at once, daemon-wide: ``with gate.enter(): ...``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open = 0

    @property
    def open_streams(self) -> int:
        return self._open

    def enter(self) -> "StreamGate":
        if self._open >= self._limit:
            raise ResourceExhausted(f"{self._open} Put/Get streams are open, the daemon-wide limit "
                                    f"(server.max_concurrent_streams={self._limit}); retry later")
        self._open += 1
        return self

    def __enter__(self) -> "StreamGate":
        return self

    def __exit__(self, *exc) -> None:
        self._open -= 1
