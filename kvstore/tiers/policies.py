"""Eviction policies as types: which chunk a full tier gives up first.

A policy only orders ids; it never frees anything. The owning tier drives it:

- ``insert(cid, size)`` when a chunk becomes visible, ``touch(cid)`` on every hit,
  ``remove(cid, evicted=...)`` when the chunk leaves the tier (by delete or by eviction);
- ``victims()`` yields candidate ids in eviction order. For each yielded id the tier either
  evicts it (and calls ``remove(cid, evicted=True)`` before advancing the iterator) or skips
  it (pinned, leased, being written) by simply advancing. The iterator ends after a bounded
  number of steps even when every id is skipped, so a tier full of pinned chunks terminates.

Threading: policies are not thread-safe; the owning tier calls them under its own lock.
Every method is O(1) amortised except ``victims()``, which is O(skipped + evicted).
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from typing import Iterator

from .. import config
from ..domain.types import ChunkId

#: Share of the capacity (bytes) given to S3-FIFO's probationary small queue, per the paper
#: (Yang et al., SOSP'23): 10% filters one-hit wonders without starving the main queue.
S3FIFO_SMALL_SHARE = 0.10
#: Saturating access counter of S3-FIFO (2 bits): a chunk survives at most this many passes of
#: the main queue's clock hand without being touched again.
S3FIFO_MAX_FREQ = 3


class EvictionPolicy(abc.ABC):
    """Orders the ids of one tier for eviction (see the module docstring for the protocol)."""

    #: Short name reported in ``TierStats.policy``.
    name: str = ""

    @abc.abstractmethod
    def insert(self, cid: ChunkId, size: int) -> None:
        """A new chunk of ``size`` bytes became visible in the tier (``cid`` not yet present)."""

    @abc.abstractmethod
    def touch(self, cid: ChunkId) -> None:
        """A hit on ``cid``; ignored when ``cid`` is not tracked."""

    @abc.abstractmethod
    def remove(self, cid: ChunkId, evicted: bool = False) -> None:
        """``cid`` left the tier; ``evicted`` says it was chosen by ``victims()`` (as opposed
        to an explicit delete). Ignored when ``cid`` is not tracked."""

    @abc.abstractmethod
    def victims(self) -> Iterator[ChunkId]:
        """Candidates in eviction order (see the module docstring)."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __contains__(self, cid: object) -> bool: ...


class LRU(EvictionPolicy):
    """Least recently used: an ``OrderedDict`` whose head is the coldest id."""

    name = "lru"

    def __init__(self, capacity_bytes: int = 0) -> None:
        self._order: OrderedDict[ChunkId, int] = OrderedDict()

    def insert(self, cid: ChunkId, size: int) -> None:
        self._order[cid] = size
        self._order.move_to_end(cid)

    def touch(self, cid: ChunkId) -> None:
        if cid in self._order:
            self._order.move_to_end(cid)

    def remove(self, cid: ChunkId, evicted: bool = False) -> None:
        self._order.pop(cid, None)

    def victims(self) -> Iterator[ChunkId]:
        # Walk a snapshot so the tier may remove yielded ids while iterating; skipped ids keep
        # their place (they are still the coldest once their pin or lease goes away).
        for cid in list(self._order):
            if cid in self._order:
                yield cid

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, cid: object) -> bool:
        return cid in self._order


class S3FIFO(EvictionPolicy):
    """S3-FIFO: a small probationary FIFO (~10% of bytes), a main FIFO with a 2-bit access
    counter (clock-like reinsertion), and a ghost FIFO of recently evicted ids.

    New ids enter the small queue; an id evicted from small without a hit goes to the ghost
    queue (ids only), one that was hit moves to main. An id inserted while in the ghost queue
    goes straight to main. A one-pass scan therefore only churns the small queue and leaves
    the hot working set in main alone. Hits only bump a counter (no reordering), so ``touch``
    is cheap.
    """

    name = "s3fifo"

    def __init__(self, capacity_bytes: int) -> None:
        self._small_target_bytes = max(1, int(capacity_bytes * S3FIFO_SMALL_SHARE))
        self._small: OrderedDict[ChunkId, int] = OrderedDict()   # cid -> size
        self._main: OrderedDict[ChunkId, int] = OrderedDict()
        self._freq: dict[ChunkId, int] = {}
        self._ghost: OrderedDict[ChunkId, None] = OrderedDict()
        self._small_bytes = 0

    def insert(self, cid: ChunkId, size: int) -> None:
        self._freq[cid] = 0
        if cid in self._ghost:
            del self._ghost[cid]
            self._main[cid] = size
        else:
            self._small[cid] = size
            self._small_bytes += size

    def touch(self, cid: ChunkId) -> None:
        f = self._freq.get(cid)
        if f is not None and f < S3FIFO_MAX_FREQ:
            self._freq[cid] = f + 1

    def remove(self, cid: ChunkId, evicted: bool = False) -> None:
        if self._freq.pop(cid, None) is None:
            return
        size = self._small.pop(cid, None)
        if size is not None:
            self._small_bytes -= size
            if evicted:
                self._remember(cid)
        else:
            self._main.pop(cid, None)

    def _remember(self, cid: ChunkId) -> None:
        self._ghost[cid] = None
        # The ghost queue remembers about as many ids as the cache holds.
        while len(self._ghost) > max(1, len(self._freq)):
            self._ghost.popitem(last=False)

    def _promote(self, cid: ChunkId) -> None:
        size = self._small.pop(cid)
        self._small_bytes -= size
        self._main[cid] = size

    def victims(self) -> Iterator[ChunkId]:
        # Every id costs at most S3FIFO_MAX_FREQ decrements, one promotion and one yield per
        # full cycle; two cycles bound the walk when everything is skipped.
        budget = 2 * (S3FIFO_MAX_FREQ + 2) * (len(self._small) + len(self._main)) + 2
        while budget > 0 and (self._small or self._main):
            budget -= 1
            if self._small and (self._small_bytes >= self._small_target_bytes or not self._main):
                cid = next(iter(self._small))
                if self._freq[cid] > 0:
                    self._freq[cid] = 0
                    self._promote(cid)
                    continue
                yield cid
                if cid in self._small:      # skipped: give it a place in main, not at the head
                    self._promote(cid)
            else:
                cid = next(iter(self._main))
                if self._freq[cid] > 0:
                    self._freq[cid] -= 1
                    self._main.move_to_end(cid)
                    continue
                yield cid
                if cid in self._main:
                    self._main.move_to_end(cid)

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, cid: object) -> bool:
        return cid in self._freq


def make_policy(kind: config.EvictionPolicy, capacity_bytes: int) -> EvictionPolicy:
    """The policy object for a config value; ``capacity_bytes`` sizes S3-FIFO's queues."""
    if kind is config.EvictionPolicy.LRU:
        return LRU(capacity_bytes)
    if kind is config.EvictionPolicy.S3FIFO:
        return S3FIFO(capacity_bytes)
    raise ValueError(f"unknown eviction policy {kind!r}")
