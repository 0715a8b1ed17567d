"""The connector's connection to the sidecar, which may be absent or restart at any time.

A request never fails because of the sidecar: :meth:`SidecarLink.client` returns ``None``
while the sidecar cannot be reached (the caller treats that as a miss / skips the save), and
tries again once ``reconnect_s`` has passed. Any client error on a call made through
:meth:`call` drops the connection the same way, so a restarted daemon (new arena, new
process) is picked up by a fresh client on the next attempt.

Thread model: used from the engine's scheduler or worker thread and from the connector's
one save thread; ``_lock`` guards ``_client`` and ``_retry_at``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

from kvstore_wire.keys import Namespace

from ...client import KVStoreClient
from ...errors import KVStoreClientError
from .config import ConnectorConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


class SidecarLink:
    def __init__(self, cfg: ConnectorConfig, namespace: Namespace) -> None:
        self.cfg = cfg
        self.namespace = namespace
        self._lock = threading.Lock()
        self._client: KVStoreClient | None = None
        self._retry_at = 0.0
        self._down_since: float | None = None
        self.failures = 0      #: connects or calls that failed (each one was a miss or a skipped save)

    def client(self) -> KVStoreClient | None:
        with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() < self._retry_at:
                return None
            try:
                self._client = KVStoreClient(self.cfg.addr, self.namespace, token=self.cfg.token,
                                             timeout_s=self.cfg.timeout_s, tls=self.cfg.tls)
                log.log(logging.WARNING if self.failures else logging.INFO, "kvstore connector: connected to %s (%s)",
                        self.cfg.addr, self._client.transport)
                self._down_since = None
            except KVStoreClientError as e:
                self._down(e)
            return self._client

    def call(self, fn: Callable[[KVStoreClient], T], default: T) -> T:
        """``fn(client)``, or ``default`` when the sidecar is unreachable or the call fails."""
        c = self.client()
        if c is None:
            return default
        try:
            return fn(c)
        except Exception as e:  # noqa: BLE001 - the engine's request never fails because of the sidecar
            if not isinstance(e, KVStoreClientError):   # not the sidecar's answer: a client bug, say so
                log.warning("kvstore connector: unexpected client error (treated as a miss): %r", e, exc_info=True)
            with self._lock:
                dropped = self._client is c
                if dropped:
                    self._client = None
                self._down(e)
            if dropped:
                c.close()
            return default

    def _down(self, e: Exception) -> None:
        self.failures += 1
        self._retry_at = time.monotonic() + self.cfg.reconnect_s
        if self._down_since is not None:      # said once per outage; the retries are quiet
            log.debug("kvstore connector: sidecar %s still unavailable (%s)", self.cfg.addr, e)
            return
        self._down_since = time.monotonic()
        log.warning("kvstore connector: sidecar %s unavailable (%s); treating requests as misses, retrying in "
                    "%.1f s", self.cfg.addr, e, self.cfg.reconnect_s)

    def close(self) -> None:
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            c.close()
