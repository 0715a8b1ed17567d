"""What an engine adapter needs from the store, and the background writer it stores through.

The adapter talks to :class:`PrefixStore`, not to gRPC: the sync ``KVStoreClient`` satisfies
it today (streamed gRPC), and a shared-memory client can replace it without the adapter
changing (issue 4, item 1).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class PrefixStore(Protocol):
    """The three calls an adapter makes. ``kv`` is ``[layers, 2, tokens, kv_heads, head_dim]``.

    - ``lookup(tokens)``: one round trip; returns an object with ``matched_tokens`` (whole
      chunks) and ``tiers`` (one per matched chunk).
    - ``retrieve(tokens)``: ``(matched_tokens, kv)`` for the longest stored prefix of ``tokens``.
    - ``store(tokens, kv)``: stores the full chunks of ``tokens`` whose KV is ``kv``; returns
      the number of chunks newly stored. Must be safe to call from a background thread.
    """

    def lookup(self, tokens: Sequence[int]) -> Any: ...

    def retrieve(self, tokens: Sequence[int]) -> tuple[int, Any]: ...

    def store(self, tokens: Sequence[int], kv: Any) -> int: ...


class StoreQueue:
    """Runs stores on one background thread so they never delay a request.

    Thread model: :meth:`submit` is called by the generating thread and never blocks; the
    jobs run in order on one worker thread. When ``max_pending`` jobs are already waiting,
    a new job is dropped and counted in :attr:`dropped` (the KV is merely not cached; the
    generation is unaffected). A job's exception is logged when it happens and re-raised by
    the next :meth:`flush`, so failures are never silent.
    """

    def __init__(self, max_pending: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-store")
        self._max_pending = max_pending
        self._lock = threading.Lock()  # guards _pending, _errors, dropped, stored_chunks
        self._pending: set[Future] = set()
        self._errors: list[BaseException] = []
        self.dropped = 0
        self.stored_chunks = 0

    def submit(self, job: Callable[[], int]) -> Future | None:
        with self._lock:
            if len(self._pending) >= self._max_pending:
                self.dropped += 1
                log.warning("store queue full (%d pending); dropping a store", len(self._pending))
                return None
            fut = self._pool.submit(job)
            self._pending.add(fut)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut: Future) -> None:
        with self._lock:
            self._pending.discard(fut)
            exc = fut.exception()
            if exc is not None:
                self._errors.append(exc)
            else:
                self.stored_chunks += int(fut.result() or 0)
        if exc is not None:
            log.warning("background KV store failed: %s", exc)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self, timeout_s: float | None = None) -> None:
        """Waits for every submitted store; raises the first error since the last flush."""
        with self._lock:
            waiting = list(self._pending)
        for fut in waiting:
            fut.exception(timeout=timeout_s)
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def close(self, timeout_s: float | None = None) -> None:
        try:
            self.flush(timeout_s)
        finally:
            self._pool.shutdown(wait=True)
