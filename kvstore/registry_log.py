"""An append-only log of JSON records with group-committed fsync (the namespace registry's store).

File format: a header line ``{"kvstore_registry_log": 1}``, then one JSON object per line.
``append`` writes one line (O(1), no fsync); ``sync(seq)`` returns once every record up to
``seq`` is on disk, and one fsync covers every record appended before it started (concurrent
registrations share fsyncs). A last line without its newline, or that does not parse, is what a
crash mid-append leaves: ``load`` drops it (and truncates the file there). A bad line anywhere
else is corruption and raises InvalidArgument.

Threading: ``append`` must be serialised by the caller (the registry's lock); ``sync`` may be
called from any thread and takes ``_sync_lock`` only (never while the caller's lock is held).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Iterable

from .domain.errors import InvalidArgument

log = logging.getLogger(__name__)

_HEADER = {"kvstore_registry_log": 1}


class RegistryLog:
    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self._path = Path(path)
        self._fsync = fsync
        self._fd = -1
        self._appended = 0   # records appended since open (seq of the last one)
        self._synced = 0     # records known durable
        self._sync_lock = threading.Lock()

    @property
    def appended_seq(self) -> int:
        return self._appended

    # ------------------------------------------------------------------ start
    def load(self) -> list[dict]:
        """Every record in the log (creating it when missing), and opens it for appending."""
        records: list[dict] = []
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            self._create([])
            return records
        lines = data.split(b"\n")
        good_end = 0
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            if last and line == b"":
                break
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or last:  # no newline after it: a torn append
                    raise ValueError("incomplete record")
            except ValueError:
                if i >= len(lines) - 2 and i > 0:  # the last record: torn by a crash, drop it
                    log.warning("namespace registry %s: dropping a torn last record (%d bytes)", self._path,
                                len(line))
                    break
                raise InvalidArgument(f"namespace registry {self._path} is corrupt at line {i + 1}; restore it "
                                      "from a backup or move it away (clients re-register their namespaces)") from None
            if i == 0:
                if rec != _HEADER:
                    raise InvalidArgument(f"{self._path} is not a kvstore registry log (header {rec!r})")
            else:
                records.append(rec)
            good_end += len(line) + 1
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND)
        if good_end < len(data):
            os.ftruncate(self._fd, good_end)
            os.fsync(self._fd)
        return records

    def rewrite(self, records: Iterable[dict]) -> None:
        """Replaces the log atomically with ``records`` (compaction, conversion)."""
        self.close()
        self._create(list(records))

    def _create(self, records: list[dict]) -> None:
        tmp = self._path.with_suffix(".tmp")
        body = b"".join(_line(r) for r in [_HEADER, *records])
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._path)
        dfd = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND)
        self._synced = self._appended

    # ------------------------------------------------------------------ appending
    def append(self, record: dict) -> int:
        """Writes one record (not yet durable); returns its sequence number for ``sync``."""
        _write_all(self._fd, _line(record))
        self._appended += 1
        return self._appended

    def sync(self, seq: int) -> None:
        """Returns once records up to ``seq`` are durable (one fsync per group of callers)."""
        if not self._fsync:
            return
        with self._sync_lock:
            if self._synced >= seq:
                return
            target = self._appended  # everything written so far is covered by this fsync
            os.fsync(self._fd)
            self._synced = target

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _line(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
