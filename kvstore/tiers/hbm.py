"""The HBM tier: a daemon-owned GPU memory pool, shared with engine processes on the same GPU.

One plain ``cudaMalloc`` allocation of ``capacity_bytes`` (the byte budget) is carved into
pages by a ``PageAllocator``; chunks are stored raw (or as stored: the tier moves bytes). Its
CUDA IPC handle (``export()``) lets a co-located engine map the whole pool once
(``kvstore_client.gpu.HbmPoolMapping.open``) and load leased extents device-to-device
into its paged blocks. The pool outlives engine processes: an engine that dies only loses its
mapping (the driver unmaps it); its leases expire on the daemon like DRAM-arena leases.

Eviction demotes: ``on_evict(cid, meta, payload)`` (a host copy of the bytes) is called for
each victim before its pages are reused, so the manager can put it into DRAM.

Without a GPU, ``make_hbm_tier`` raises ``FailedPrecondition``; nothing here initialises CUDA
at import. Wiring: the tier registry builds it when ``chain.tiers`` names ``"hbm"`` (config
section ``[hbm]``); ``chain.build`` points ``set_demote`` at the next tier down; the store's
``LocalAccess`` reaches it through ``device_pool()`` (this object, a ``DevicePool``) and the
LocalData service puts ``export()`` into ``AttachResponse.hbm`` and ``lease(cid)``'s extents
into ``LeaseRead`` answers (``device_pool = true``), held in the same lease table (TTL) as
arena leases.

Threading: every method is thread-safe; ``_lock`` guards the index and the allocator. Copies
run outside the lock on pages no other entry can own (reserved, or leased). Lock order:
``_lock`` may call ``PinTable.is_pinned`` (which takes only its own lock); ``on_evict`` and
the listener are called with ``_lock`` released for ``on_evict``, held for the listener (as
``Tier`` requires).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..domain.errors import KVStoreError, FailedPrecondition, InvalidArgument, ResourceExhausted
from ..domain.types import ChunkId, ChunkMeta, Medium
from .arena import PageAllocator
from .base import ChunkRef, EntryInfo, PinTable, Tier, TierStats

log = logging.getLogger(__name__)

#: Pool page: extents start on this boundary (the widest vector the copy kernels use is 16 B;
#: 4 KiB keeps the allocator small for multi-MB chunks).
HBM_PAGE_BYTES = 4096
#: Pool bytes per generation counter. The daemon increments the counters of every block a
#: page run touches when it allocates the run, before anything writes into it; a reader that
#: copied pool bytes without a lease proves they did not change under the copy by reading the
#: counters before and after it (docs/local-path.md, "HBM loads without a lease").
GEN_BLOCK_BYTES = 1 << 20

Demote = Callable[[ChunkId, ChunkMeta, memoryview], None]


@dataclass
class _Entry:
    meta: ChunkMeta
    page: int
    npages: int
    leases: int = 0
    deleted: bool = False
    last_access_s: float = 0.0
    hits: int = 0


@dataclass(eq=False)
class DeviceLease:
    """A read lease on one chunk's pool extent (``offset`` bytes into the pool); the extent
    stays unchanged until ``release()`` (idempotent)."""

    cid: ChunkId
    meta: ChunkMeta
    offset: int
    _release: Callable[[], None] | None

    def release(self) -> None:
        fn, self._release = self._release, None
        if fn is not None:
            fn()


@dataclass(frozen=True)
class PoolExport:
    """What a co-located process needs to map the pool: the IPC handle of its one allocation,
    its size, the device ordinal, a nonce that changes with every pool (restart check), and
    the shared file of its generation counters (empty where none could be made)."""

    ipc_handle: bytes
    pool_bytes: int
    device: int
    nonce: bytes
    generations_path: str = ""
    generation_block_bytes: int = 0


class _Generations:
    """The pool's generation counters: ``u64`` per ``GEN_BLOCK_BYTES`` of pool, in a
    shared-memory file (mode 0600, like the arena) that same-host clients map read-only.
    Written only under the tier's lock; an aligned 8-byte store is atomic for readers."""

    def __init__(self, blocks: int) -> None:
        import mmap
        import os

        from .arena import AUTO_PREFIX, SHM_DIR

        self.path = str(SHM_DIR / f"{AUTO_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.hbmgen")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, 8 * blocks)
            self._mm = mmap.mmap(fd, 8 * blocks)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        self.counters = np.frombuffer(self._mm, dtype=np.uint64)

    def bump(self, offset: int, nbytes: int) -> None:
        lo = offset // GEN_BLOCK_BYTES
        hi = (offset + max(nbytes, 1) - 1) // GEN_BLOCK_BYTES
        self.counters[lo:hi + 1] += np.uint64(1)

    def close(self) -> None:
        import os

        self.counters = None
        try:
            self._mm.close()
        except BufferError:   # a view still exists (a test): the file goes anyway
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass


class HbmTier(Tier):
    medium = Medium.HBM

    def __init__(self, capacity_bytes: int, device: int = 0, pins: PinTable | None = None,
                 on_evict: Demote | None = None, clock: Callable[[], float] = time.time) -> None:
        from kvstore_native import cuda_ipc

        if capacity_bytes < HBM_PAGE_BYTES:
            raise InvalidArgument(f"hbm capacity_bytes must be at least {HBM_PAGE_BYTES}")
        self._cuda = cuda_ipc
        self._device = device
        cuda_ipc.set_device(device)
        self._pages = capacity_bytes // HBM_PAGE_BYTES
        self.capacity_bytes = self._pages * HBM_PAGE_BYTES
        self.base = cuda_ipc.malloc(self.capacity_bytes)
        self.nonce = secrets.token_bytes(16)
        self._alloc = PageAllocator(self._pages)
        self._index: dict[ChunkId, _Entry] = {}
        self._lock = threading.Lock()
        self._pins = pins
        self._on_evict = on_evict
        self._clock = clock
        self._stats = TierStats(Medium.HBM, "lru", self.capacity_bytes)
        self._closed = False
        try:
            self._gens: _Generations | None = _Generations(-(-self.capacity_bytes // GEN_BLOCK_BYTES))
        except OSError as e:   # no /dev/shm: readers then lease every load
            log.warning("the HBM pool's generation counters could not be shared (%s); same-host loads "
                        "from the pool all take a lease", e)
            self._gens = None

    # ---- sharing
    def export(self) -> PoolExport:
        g = self._gens
        return PoolExport(self._cuda.ipc_handle(self.base), self.capacity_bytes, self._device, self.nonce,
                          g.path if g is not None else "", GEN_BLOCK_BYTES if g is not None else 0)

    def device_pool(self) -> "HbmTier":
        """This tier's ``DevicePool`` face (``export`` + ``lease``), for the same-host path."""
        return self

    def set_demote(self, fn: Demote | None) -> None:
        """Where evicted chunks go (a host copy of their bytes), before their pages are reused."""
        self._on_evict = fn

    def lease(self, cid: ChunkId) -> DeviceLease | None:
        """A ``DeviceLease`` on a stored chunk for a device-to-device reader (another process
        through the pool mapping), counted as a hit; None when absent."""
        with self._lock:
            e = self._index.get(cid)
            if e is None or e.deleted:
                self._stats.misses += 1
                return None
            e.leases += 1
            e.hits += 1
            e.last_access_s = self._clock()
            self._stats.hits += 1
        return DeviceLease(cid, e.meta, e.page * HBM_PAGE_BYTES, lambda: self._unlease(cid, e))

    def _unlease(self, cid: ChunkId, e: _Entry) -> None:
        with self._lock:
            e.leases -= 1
            if e.leases == 0 and e.deleted:
                self._alloc.free(e.page, e.npages)

    # ---- Tier primitives
    def put(self, cid: ChunkId, meta: ChunkMeta, payload: memoryview | bytes) -> bool:
        n = memoryview(payload).nbytes
        if n != meta.payload_bytes:
            raise InvalidArgument(f"payload is {n} bytes, meta says {meta.payload_bytes}")
        page = self._reserve(cid, n)
        if page is None:
            return False
        src = np.frombuffer(payload, dtype=np.uint8)
        try:
            if n:
                self._cuda.memcpy_batch([self.base + page * HBM_PAGE_BYTES], [int(src.ctypes.data)], [n], 0)
                self._cuda.stream_sync(0)
        except BaseException:
            with self._lock:
                self._alloc.free(page, self._npages(n))
            raise
        return self._publish(cid, meta, page, n)

    def put_device(self, cid: ChunkId, meta: ChunkMeta, dev_ptr: int, stream: int = 0) -> bool:
        """Stores ``meta.payload_bytes`` bytes from device memory (device-to-device)."""
        n = meta.payload_bytes
        page = self._reserve(cid, n)
        if page is None:
            return False
        self._cuda.memcpy_batch([self.base + page * HBM_PAGE_BYTES], [dev_ptr], [n], stream)
        self._cuda.stream_sync(stream)
        return self._publish(cid, meta, page, n)

    def _npages(self, n: int) -> int:
        return max(1, -(-n // HBM_PAGE_BYTES))

    def _reserve(self, cid: ChunkId, n: int) -> int | None:
        npages = self._npages(n)
        if npages > self._pages:
            raise ResourceExhausted(f"a {n}-byte chunk is larger than the HBM tier (hbm.capacity_bytes = "
                                    f"{self.capacity_bytes})")
        while True:
            with self._lock:
                if cid in self._index:
                    return None
                page = self._alloc.alloc(npages)
                if page is not None:
                    if self._gens is not None:   # before any byte of the run changes
                        self._gens.bump(page * HBM_PAGE_BYTES, npages * HBM_PAGE_BYTES)
                    return page
                v = self._pick_victim()
                if v is None:
                    raise ResourceExhausted("HBM tier full of pinned or leased chunks: unpin chunks (kvctl unpin), "
                                            "release leases, or raise hbm.capacity_bytes")
                e = self._index[v]
                e.leases += 1  # holds the pages while the victim is demoted
                self._unlink(v, e)
                self._stats.evictions += 1
            self._finish_evict(v, e)  # demotes, then frees the pages

    def _publish(self, cid: ChunkId, meta: ChunkMeta, page: int, n: int) -> bool:
        with self._lock:
            if cid in self._index:
                self._alloc.free(page, self._npages(n))
                return False
            self._index[cid] = _Entry(meta, page, self._npages(n), last_access_s=self._clock())
            self._stats.used_bytes += n
            self._stats.chunks += 1
            self._notify(cid, True)
        return True

    def _pick_victim(self) -> ChunkId | None:
        best, best_t = None, None
        for c, e in self._index.items():
            if e.leases or (self._pins is not None and self._pins.is_pinned(c)):
                continue
            if best_t is None or e.last_access_s < best_t:
                best, best_t = c, e.last_access_s
        return best

    def _unlink(self, cid: ChunkId, e: _Entry) -> None:
        """With _lock held: the chunk leaves the index; its pages are freed by the last lease."""
        del self._index[cid]
        e.deleted = True
        self._stats.used_bytes -= e.meta.payload_bytes
        self._stats.chunks -= 1
        self._notify(cid, False)

    def _finish_evict(self, cid: ChunkId, e: _Entry) -> None:
        try:
            if self._on_evict is not None:
                self._on_evict(cid, e.meta, memoryview(self._read(e)))
        finally:
            self._unlease(cid, e)

    def _read(self, e: _Entry) -> bytes:
        return self._read_at(e.page * HBM_PAGE_BYTES, e.meta.payload_bytes)

    def _read_at(self, offset: int, n: int) -> bytes:
        """A host copy of pool bytes (D2H, the caller holds a lease on them)."""
        out = np.empty(n, dtype=np.uint8)
        if n:
            self._cuda.memcpy_batch([int(out.ctypes.data)], [self.base + offset], [n], 0)
            self._cuda.stream_sync(0)
        return out.tobytes()

    def get(self, cid: ChunkId) -> ChunkRef | None:
        """A host copy of the chunk (the ``Tier`` contract hands out host views); device readers
        use ``lease``."""
        got = self.lease(cid)
        if got is None:
            return None
        try:
            data = self._read_at(got.offset, got.meta.payload_bytes)
        finally:
            got.release()
        return ChunkRef(cid, got.meta, memoryview(data), Medium.HBM)

    def contains(self, cid: ChunkId) -> bool:
        with self._lock:
            return cid in self._index

    def touch(self, cid: ChunkId) -> bool:
        """A read of the chunk made without a lease (a same-host reader's proven copy): counted
        as a hit and made recent, as a lease would; whether the pool holds it."""
        with self._lock:
            e = self._index.get(cid)
            if e is None or e.deleted:
                return False
            e.hits += 1
            e.last_access_s = self._clock()
            self._stats.hits += 1
            return True

    def delete(self, cid: ChunkId) -> bool:
        with self._lock:
            e = self._index.get(cid)
            if e is None:
                return False
            self._unlink(cid, e)
            if e.leases == 0:
                self._alloc.free(e.page, e.npages)
        return True

    def evict(self, nbytes: int) -> list[ChunkId]:
        out: list[tuple[ChunkId, _Entry]] = []
        with self._lock:
            while self._alloc.free_pages * HBM_PAGE_BYTES < nbytes:
                v = self._pick_victim()
                if v is None:
                    break
                e = self._index[v]
                e.leases += 1
                self._unlink(v, e)
                self._stats.evictions += 1
                out.append((v, e))
        for v, e in out:
            self._finish_evict(v, e)
        return [v for v, _ in out]

    def scan(self, prefix: bytes = b"", after: bytes = b"", limit: int = 0) -> Iterator[EntryInfo]:
        with self._lock:
            rows = sorted((c, e) for c, e in self._index.items() if c.startswith(prefix) and c > after)
        for i, (c, e) in enumerate(rows):
            if limit and i >= limit:
                return
            yield EntryInfo(c, e.meta, e.last_access_s, e.hits)

    def stats(self) -> TierStats:
        with self._lock:
            s = TierStats(**{k: getattr(self._stats, k) for k in TierStats.__dataclass_fields__})
            s.pinned_chunks = sum(1 for c in self._index if self._pins is not None and self._pins.is_pinned(c))
            return s

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._gens is not None:
                self._gens.close()
            self._cuda.free(self.base)


def demote_into(tier: "HbmTier", below: Tier) -> None:
    """Evicted chunks of ``tier`` are put into ``below`` (unless it holds them already); a
    refusal there is logged and the chunk is dropped (it was a cache copy), never raised
    into the put that caused the eviction."""

    def demote(cid: ChunkId, meta: ChunkMeta, data: memoryview) -> None:
        try:
            if not below.contains(cid):
                below.put(cid, meta, data)
        except KVStoreError as err:
            log.warning("HBM eviction could not demote %s to %s (dropped): %s", cid.hex(), below.medium.name, err)

    tier.set_demote(demote)


def make_hbm_tier(capacity_bytes: int, device: int = 0, pins: PinTable | None = None,
                  demote: Demote | None = None) -> HbmTier:
    """The HBM tier, or ``FailedPrecondition`` where no CUDA device (or CUDA build) exists."""
    try:
        from kvstore_native import cuda_ipc
    except ImportError as e:  # pragma: no cover - the package ships cuda_ipc
        raise FailedPrecondition(f"the HBM tier needs kvstore_native's CUDA build: {e}") from e
    if not cuda_ipc.available():
        raise FailedPrecondition("chain.tiers names 'hbm', but this host has no CUDA device (or "
                                 "kvstore_native was built without libkvstore_cuda.so); remove 'hbm' from "
                                 "chain.tiers on hosts without a GPU")
    try:
        return HbmTier(capacity_bytes, device, pins, demote)
    except cuda_ipc.CudaError as e:
        raise FailedPrecondition(f"cannot allocate the {capacity_bytes}-byte HBM pool on GPU {device} "
                                 f"(hbm.capacity_bytes, hbm.device): {e}") from e
