"""Fault injection as a composable wrapper: ``FaultyTier(inner, fail_get=0.5, delay_s=0.01)``.

Wraps any ``Tier`` and, before delegating ``get``/``put``/``delete``, sleeps ``delay_s`` and
raises ``Unavailable`` with the given probabilities. Used by tests and chaos runs to show that
the chain survives a failing lower tier; never enabled in production config (the chain
builder takes it as a test-only ``wrap`` argument). ``rng`` makes runs reproducible. The
wrapper may be switched at run time by assigning its ``fail_*``/``delay_s`` attributes.
"""

from __future__ import annotations

import random
import threading
import time

from ..domain.errors import Unavailable
from ..domain.types import ChunkId, ChunkMeta
from .base import ChunkRef, Tier
from .wrapper import TierWrapper


class FaultyTier(TierWrapper):
    def __init__(self, inner: Tier, fail_get: float = 0.0, fail_put: float = 0.0,
                 fail_delete: float = 0.0, delay_s: float = 0.0, rng: random.Random | None = None) -> None:
        super().__init__(inner)
        self.fail_get = fail_get
        self.fail_put = fail_put
        self.fail_delete = fail_delete
        self.delay_s = delay_s
        self.injected = 0          # faults raised so far
        self._rng = rng or random.Random()
        self._lock = threading.Lock()   # guards ``_rng`` and ``injected``; never held while sleeping

    def _maybe_fail(self, p: float, op: str) -> None:
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        if p <= 0:
            return
        with self._lock:
            hit = self._rng.random() < p
            if hit:
                self.injected += 1
        if hit:
            raise Unavailable(f"injected fault in {type(self.inner).__name__}.{op}")

    def get(self, cid: ChunkId) -> ChunkRef | None:
        self._maybe_fail(self.fail_get, "get")
        return self.inner.get(cid)

    def peek(self, cid: ChunkId) -> ChunkRef | None:
        self._maybe_fail(self.fail_get, "peek")
        return self.inner.peek(cid)

    def put(self, cid: ChunkId, meta: ChunkMeta, payload) -> bool:
        self._maybe_fail(self.fail_put, "put")
        return self.inner.put(cid, meta, payload)

    def delete(self, cid: ChunkId) -> bool:
        self._maybe_fail(self.fail_delete, "delete")
        return self.inner.delete(cid)
