"""The presence index: which chunks a same-host daemon holds, readable without an RPC.

The daemon publishes a bucketed hash table in a shared-memory file next to its arena (see
docs/local-path.md for the byte layout). A local client maps it read-only and answers
``lookup`` by probing it: about a microsecond per key instead of a gRPC round trip, which
is what lets one host serve tens of thousands of prefix lookups per second.

The index is advisory, like any lookup: a chunk can be evicted between a lookup and the
read that follows, and the read then reports the miss. It never claims a chunk of another
namespace (the tag mixes in the namespace id); a full bucket sets its overflow counter and
readers then ask the daemon instead, so the index has no false negatives.

Layout (all little-endian):
    0   16  magic  b"kvstore-index-1\\0"
    16  16  nonce  (the arena's nonce: pairs this index with that arena)
    32   8  u64 number of buckets (a power of two)
    40   8  u64 flags: bit 0 ``FLAG_MISS_ASK_DAEMON`` (the daemon can fill a miss from a
            tier this index does not list, e.g. a remote tier shared by replicas: a prefix
            that ends here must be asked over the RPC); other bits zero
    48  16  reserved (zero)
    64   n  u8 overflow counter per bucket (saturating), padded to 64 bytes
    ..      buckets: n x 8 u64 slots (one 64-byte cache line each)
A slot is 0 (empty) or ``tag | tiers``: ``tag`` = the high 56 bits of
``u64le(key[0:8]) XOR u64le(namespace_id[0:8])`` (0x100 when those are all zero), ``tiers``
= the low 8 bits, one bit per medium (1 << (Tier - 1)). The bucket is
``u64le(key[8:16]) mod n``.
"""

from __future__ import annotations

import mmap
import os
import struct
import weakref

import numpy as np

from .types import Tier

MAGIC = b"kvstore-index-1\0"
HEADER_BYTES = 64
SLOTS_PER_BUCKET = 8
_TAG_MASK = 0xFFFF_FFFF_FFFF_FF00
_TIER_MASK = 0xFF
_U64 = struct.Struct("<Q")
#: Header flag: a miss in the index is not final; ask the daemon (it may fetch the chunk).
FLAG_MISS_ASK_DAEMON = 1


def tag_and_bucket(namespace_id: bytes, key: bytes, nbuckets: int) -> tuple[int, int]:
    tag = (_U64.unpack_from(key, 0)[0] ^ _U64.unpack_from(namespace_id, 0)[0]) & _TAG_MASK
    return tag or 0x100, _U64.unpack_from(key, 8)[0] & (nbuckets - 1)


def tier_bit(tier: Tier) -> int:
    return 1 << (int(tier) - 1)


def tiers_of(mask: int) -> list[Tier]:
    return [t for t in (Tier.HBM, Tier.DRAM, Tier.DISK, Tier.REMOTE) if mask & tier_bit(t)]


def fastest(mask: int) -> Tier:
    """The fastest medium in ``mask`` (HBM < DRAM < DISK < REMOTE), NONE for 0."""
    for t in (Tier.HBM, Tier.DRAM, Tier.DISK, Tier.REMOTE):
        if mask & tier_bit(t):
            return t
    return Tier.NONE


def layout(nbuckets: int) -> tuple[int, int, int]:
    """(overflow offset, buckets offset, total bytes) for ``nbuckets`` buckets."""
    ovf = HEADER_BYTES
    buckets = ovf + (nbuckets + 63) // 64 * 64
    return ovf, buckets, buckets + nbuckets * SLOTS_PER_BUCKET * 8


class PresenceReader:
    """A client's read-only view of the daemon's presence index."""

    def __init__(self, mm: mmap.mmap, nbuckets: int, fd: int = -1) -> None:
        self._mm = mm
        self._fd = fd     # kept open to notice when the daemon removed the file (it stopped)
        # A reader dropped without close() (a client re-attached while another thread still
        # probed it) gives its descriptor back when it is collected; the mapping goes with it.
        self._fd_closer = weakref.finalize(self, os.close, fd) if fd >= 0 else None
        self.nbuckets = nbuckets
        ovf, b, _ = layout(nbuckets)
        self._overflow = memoryview(mm)[ovf:ovf + nbuckets]
        self._slots = memoryview(mm)[b:].cast("Q")
        #: A key absent here may still be served by the daemon (``FLAG_MISS_ASK_DAEMON``).
        self.miss_asks_daemon = bool(_U64.unpack_from(mm, 40)[0] & FLAG_MISS_ASK_DAEMON)

    @classmethod
    def open(cls, path: str, nonce: bytes) -> "PresenceReader | None":
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                os.close(fd)
                return None
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), mmap.PROT_READ)
        except OSError:
            os.close(fd)
            return None
        n = _U64.unpack_from(mm, 32)[0]
        if mm[:16] != MAGIC or mm[16:32] != nonce or n == 0 or n & (n - 1) or layout(n)[2] > size:
            mm.close()
            os.close(fd)
            return None
        return cls(mm, n, fd)

    def stale(self) -> bool:
        """True once the daemon that wrote this index removed it (it stopped or restarted):
        the client must attach again. One fstat (about a microsecond)."""
        try:
            return self._fd >= 0 and os.fstat(self._fd).st_nlink == 0
        except OSError:
            return True

    def probe(self, namespace_id: bytes, key: bytes) -> int | None:
        """The tier mask of ``key`` (0 = absent), or None when the index cannot tell
        (its bucket overflowed: ask the daemon)."""
        tag, b = tag_and_bucket(namespace_id, key, self.nbuckets)
        base = b * SLOTS_PER_BUCKET
        slots = self._slots
        for i in range(base, base + SLOTS_PER_BUCKET):
            v = slots[i]
            if v & _TAG_MASK == tag:
                return v & _TIER_MASK
        return None if self._overflow[b] else 0

    def close(self) -> None:
        self._overflow.release()
        self._slots.release()
        self._mm.close()
        if self._fd_closer is not None:
            self._fd_closer()      # closes the descriptor once
            self._fd = -1


class PresenceWriter:
    """The daemon's side. Not thread-safe: the caller serialises ``update`` (one lock)."""

    def __init__(self, buf: memoryview, nbuckets: int, nonce: bytes, flags: int = 0) -> None:
        if nbuckets <= 0 or nbuckets & (nbuckets - 1):
            raise ValueError("the number of buckets must be a power of two")
        ovf, b, total = layout(nbuckets)
        if buf.nbytes < total:
            raise ValueError("buffer too small for the index")
        self.nbuckets = nbuckets
        np.frombuffer(buf, np.uint8, total)[:] = 0
        buf[0:16] = MAGIC
        buf[16:32] = nonce
        buf[32:40] = _U64.pack(nbuckets)
        buf[40:48] = _U64.pack(flags)
        self._overflow = np.frombuffer(buf, np.uint8, nbuckets, ovf)
        self._slots = np.frombuffer(buf, np.uint64, nbuckets * SLOTS_PER_BUCKET, b)
        self.overflowed = 0

    def update(self, namespace_id: bytes, key: bytes, bit: int, present: bool) -> None:
        """Sets or clears one medium's bit for a chunk. Each slot changes with one aligned
        8-byte store, so readers see the old or the new value, never a mix."""
        tag, b = tag_and_bucket(namespace_id, key, self.nbuckets)
        base = b * SLOTS_PER_BUCKET
        bucket = self._slots[base:base + SLOTS_PER_BUCKET]
        empty = -1
        for i in range(SLOTS_PER_BUCKET):
            v = int(bucket[i])
            if v & _TAG_MASK == tag:
                mask = (v | bit) if present else (v & ~bit & _TIER_MASK)
                bucket[i] = (tag | mask) if mask & _TIER_MASK else 0
                return
            if v == 0 and empty < 0:
                empty = i
        if not present:
            return
        if empty >= 0:
            bucket[empty] = tag | bit
        elif self._overflow[b] < 255:
            # No room: readers of this bucket fall back to asking the daemon. Saturating,
            # never decremented (the bucket may still hold overflowed chunks).
            self._overflow[b] += 1
            self.overflowed += 1
