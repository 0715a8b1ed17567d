"""The daemon side of the presence index (layout: ``kvstore_wire/presence.py``).

A shared-memory file beside the arena (``<arena>.index``, mode 0600) that the manager keeps
current from the tiers' change events, so same-host clients answer lookups without an RPC.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from pathlib import Path

from kvstore_wire.presence import PresenceWriter, layout, tier_bit

from ..domain.types import ChunkId, Medium, split_chunk_id

log = logging.getLogger(__name__)


class PresenceIndex:
    """Thread-safe: tiers call ``changed`` from any thread, with their own lock held (lock
    order: tier lock -> ``PresenceIndex._lock``; the index never calls into a tier)."""

    def __init__(self, path: Path, nbuckets: int, nonce: bytes) -> None:
        self.path = path
        size = layout(nbuckets)[2]
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
                self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError:
                path.unlink(missing_ok=True)
                raise
        finally:
            os.close(fd)
        self._lock = threading.Lock()
        self._buf = memoryview(self._mm)
        self._writer = PresenceWriter(self._buf, nbuckets, nonce)

    def changed(self, cid: ChunkId, medium: Medium, present: bool) -> None:
        ns, key = split_chunk_id(cid)
        with self._lock:
            self._writer.update(ns, key, tier_bit(medium), present)

    @property
    def overflowed(self) -> int:
        return self._writer.overflowed

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        self._writer = None
        self._buf.release()
        try:
            self._mm.close()
        except BufferError:
            log.warning("presence index closed while views are held; unmapping when they are released")
