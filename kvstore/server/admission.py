"""Admission control for streams: a daemon-wide in-flight byte budget, a cap on open streams
and a per-stream idle deadline (docs/security.md, "Admission control").

``InflightBudget`` counts request bytes the daemon holds in memory but has not stored yet
(Put data as it arrives). Nothing is allocated from an announced length: bytes are counted
when they have arrived, so a header-only stream costs nothing, and a stream over budget
stops reading (gRPC flow control then stops its sender) for at most ``wait_s`` before it is
refused with RESOURCE_EXHAUSTED.

``StreamGate`` caps the Put and Get streams open at once; one more is refused at once.

``next_within`` reads the next message of a request stream, or raises DeadlineExceeded when
none arrives within the idle deadline (the handler then ends and frees what it held).

Threading: event-loop thread only (no locks); every method is non-blocking or a coroutine.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import AsyncIterator, TypeVar

from ..domain.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted

T = TypeVar("T")

#: Returned by ``next_within`` when the stream ended.
END = object()


class InflightBudget:
    """Bytes held by requests in flight, daemon-wide. Waiters are served first come, first
    served, so a large request is not starved by a stream of small ones."""

    def __init__(self, limit_bytes: int, wait_s: float) -> None:
        if limit_bytes <= 0:
            raise InvalidArgument("server.max_inflight_bytes must be positive")
        self._limit = limit_bytes
        self._wait_s = wait_s
        self._used = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def limit_bytes(self) -> int:
        return self._limit

    async def acquire(self, n: int) -> None:
        """Counts ``n`` bytes, waiting up to ``wait_s`` for room. ResourceExhausted naming
        ``server.max_inflight_bytes`` when there is none in time (nothing is counted then)."""
        if n > self._limit:
            raise ResourceExhausted(f"a request of {n} bytes exceeds the daemon's in-flight budget "
                                    f"(server.max_inflight_bytes={self._limit}); send smaller chunks")
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
                f"the daemon holds {self._used} of its server.max_inflight_bytes={self._limit} bytes of requests "
                f"in flight and none were freed within server.inflight_wait_s={self._wait_s:g} s; retry later, "
                "or raise server.max_inflight_bytes") from None

    def release(self, n: int) -> None:
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


async def next_within(it: AsyncIterator[T], idle_s: float, what: str = "stream"):
    """The next item of ``it``, or ``END``; DeadlineExceeded naming
    ``server.stream_idle_timeout_s`` when nothing arrives within ``idle_s``."""
    try:
        return await asyncio.wait_for(it.__anext__(), idle_s)
    except StopAsyncIteration:
        return END
    except asyncio.TimeoutError:
        raise DeadlineExceeded(f"{what} sent nothing for {idle_s:g} s (server.stream_idle_timeout_s); "
                               "it was cancelled and what it had sent was dropped") from None


class IdleWatchdog:
    """Ends a response stream whose reader stopped reading: a ``with watchdog:`` block (one
    send) that takes longer than ``idle_s`` is cancelled, and the block raises
    DeadlineExceeded naming ``server.stream_idle_timeout_s`` instead (so the caller gets that
    status, not a silently dropped stream). Reusable; one task at a time."""

    def __init__(self, idle_s: float) -> None:
        self._idle_s = idle_s
        self._timer: asyncio.TimerHandle | None = None
        self._fired = False

    def _fire(self, task: asyncio.Task) -> None:
        self._fired = True
        task.cancel()

    def __enter__(self) -> "IdleWatchdog":
        self._fired = False
        self._timer = asyncio.get_running_loop().call_later(self._idle_s, self._fire, asyncio.current_task())
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fired and exc_type is asyncio.CancelledError:
            asyncio.current_task().uncancel()
            raise DeadlineExceeded(f"the reader took nothing for {self._idle_s:g} s "
                                   "(server.stream_idle_timeout_s); the stream was ended") from None
        return False
