"""Per-client state and request helpers of the GPU data path (kvstore_client.gpu)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .errors import KVStoreClientError
from .gpu_hbm import HbmPoolMapping
from .gpu_layout import _torch
from .gpu_pool import WritePool
from .gpu_session import GpuSession

log = logging.getLogger(__name__)

#: Chunks in the first ReserveWrite / LeaseRead of a call: a small first request is answered
#: soonest, so copies start early; the rest of the call goes in ONE more request, in flight
#: meanwhile (each RPC costs the daemon a fixed ~1 ms, serialised: fewer, larger ones win).
DEFAULT_GROUP_CHUNKS = 2
#: Growth of a call's request groups after the first (1: the rest in one group). Measured on
#: an H200 (bench/results/gpu-all-groups-2026-12-02.txt): growing groups (2, 4, 8, ...) were
#: no faster than two, each further RPC costing about what it overlapped.
DEFAULT_GROUP_GROWTH = 1
#: Stores of chunks of at least ``GROW_STORE_GROUPS_FROM`` bytes: groups of 2, 4, 8, ... chunks,
#: so each reservation's clearing overlaps the copies of the group before (H200, Llama-3-8B
#: chunks: 43% of D2H against 32% in two groups). Smaller chunks keep two groups: there the
#: extra RPCs cost more than the clearing they overlap (SmolLM2: 14% against 17%).
DEFAULT_STORE_GROUP_GROWTH = 2
GROW_STORE_GROUPS_FROM = 16 << 20
#: Chunk extents a client remembers for speculative loads (about 100 bytes each).
MAX_REMEMBERED_EXTENTS = 1 << 16
#: A load copies at most this many bytes ahead of the daemon's LeaseRead answer.
SPECULATE_BYTES = 64 << 20
#: Lease-free loads report what they read (as hits, for the daemon's recency) at most this
#: often, or once this many keys are waiting: one touch-only RPC per interval, off the load's path.
TOUCH_INTERVAL_S = 0.05
TOUCH_PENDING_MAX = 1024
#: Lease-free loads check chunks in batches of about this many bytes (at most half the
#: staging): one GPU CRC32C launch and one host wait per batch, while the batches after it
#: cross PCIe into the other regions of the staging ring. With two regions (an H200,
#: bench/results/gpu-all-lease-free-batches-2026-12-02.txt): 16 SmolLM2 chunks 50% / 61% / 70%
#: of H2D with 8 / 16 / 32 MiB batches. A ring of five 16 MiB regions was no faster than two of
#: 32 MiB (63% against 66%, bench/results/gpu-all-write-ahead-2026-12-03.txt).
UNLEASED_BATCH_BYTES = 32 << 20
#: Lease-free loads proven on the device go in batches of about this many bytes: with no host
#: wait between batches, small batches cost little and shorten the last batch's check and move.
GATED_BATCH_BYTES = 16 << 20
#: Bytes of arena extents a GPU client keeps reserved ahead of its stores (``gpu_pool``; at
#: most a sixteenth of the arena). 0: every store reserves its own (keyed ReserveWrite).
DEFAULT_WRITE_AHEAD_BYTES = 256 << 20
#: A store into write-ahead slots commits them in shrinking groups (half of what is left, then
#: half of the rest, ...; none smaller than this many bytes, the last holding what remains):
#: the CommitWrite of each group is served while the later groups' bytes cross PCIe, so only
#: the last, small group's commit follows the copies. 0: one CommitWrite per lease, after all
#: its copies (``commit_groups``). Off (0) by default: at 16 MiB on an H100 it gained nothing
#: for single-call stores and slowed streamed ones (docs/benchmarks.md, "Run of 2026-12-06, night").
DEFAULT_COMMIT_TAIL_BYTES = 0
#: Device staging buffers for paged sources (gather of chunk i+1 overlaps the PCIe copy of i).
DEFAULT_STAGING_CHUNKS = 3


class GpuPathUnusable(KVStoreClientError):
    """The GPU path cannot serve this call (no mapped arena, or it could not be registered
    with CUDA); the client core's other paths can."""


class ArenaChanged(KVStoreClientError):
    """The daemon restarted during the call (a response carried another arena's nonce); the
    client re-attaches and retries."""


class GpuPath:
    """Per-client, per-device state: streams, events, staging ring, pinned CRC buffer."""

    def __init__(self, client, device: int | None = None, staging_chunks: int = DEFAULT_STAGING_CHUNKS,
                 group_chunks: int = DEFAULT_GROUP_CHUNKS) -> None:
        """``client``: a ``KVStoreClient``, ``AsyncKVStoreClient`` or ``GpuSession``."""
        torch = _torch()
        self.client = GpuSession.of(client)
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        self.copy_stream = torch.cuda.Stream(self.device)
        self.kernel_stream = torch.cuda.Stream(self.device)
        self.staging_chunks = max(1, staging_chunks)
        self.group_chunks = max(1, group_chunks)
        self._staging: list[Any] = []
        self._staging_free: list[Any] = []  # event per slot: recorded when its last reader finished
        self._lock = threading.Lock()
        # Two: a store's commits of two leases (pool and the rest) overlap their round trips.
        self._commits = ThreadPoolExecutor(2, thread_name_prefix="kvstore-gpu-commit")
        self._pinned: dict[str, Any] = {}
        self._device_bufs: dict[str, Any] = {}
        # Checksum buffer sets rotate over calls: a set is reused only once the commits of the
        # call that used it last are done (stores with wait=False overlap their commits with
        # later calls).
        self._sets = 4
        self._next_set = 0
        self._set_busy: list[Future | None] = [None] * self._sets
        self._pool: HbmPoolMapping | None = None
        self._pool_nonce = b""
        #: Loads check each arena chunk's CRC32C on the GPU (``LeaseReadRequest.client_verifies``:
        #: the daemon skips its CPU pass); stores ask the daemon to take the GPU-computed CRC32Cs
        #: unread (``CommitWriteRequest.skip_verify``). False: the daemon's CPU checks (benchmarks).
        self.client_verifies = True
        self.skip_commit_verify = True
        #: Each request group of a call is this many times the one before (1: two groups):
        #: loads (leases are cheap) and stores (the daemon clears each reservation's stale pages,
        #: one request at a time, while the client copies the previous group).
        self.group_growth = DEFAULT_GROUP_GROWTH
        self.store_group_growth = DEFAULT_STORE_GROUP_GROWTH
        #: Loads start copying the chunks whose arena extents this client saw last (its own
        #: stores, earlier leases) before the daemon's LeaseRead answer, into device staging;
        #: a chunk is moved into the destination only once the lease confirms the same extent
        #: and its GPU CRC32C matches (``_retrieve``). False: every copy waits for its lease.
        self.speculate = True
        #: Loads read the leading chunks whose arena extents this client saw last and that the
        #: presence index lists in DRAM without any LeaseRead: into device staging, checked by
        #: their CRC32C on the GPU, moved into the destination only once it matches
        #: (``gpu_retrieve._unleased``). False: such chunks are leased first (speculatively copied).
        self.lease_free = True
        self.unleased_batch_bytes = UNLEASED_BATCH_BYTES
        #: Lease-free RAW loads prove each batch on the device (``gpu_retrieve._unleased_gated``:
        #: GPU CRC32Cs compared with the stored ones by a kernel; moves into the destination gated
        #: by the proven prefix), so the whole load is queued at once with no host wait between
        #: batches. False: the host compares each batch's CRC32Cs before moving it (``_unleased``).
        self.gated_loads = False   # measured on an H100: no faster than the host check (docs/benchmarks.md)
        self.gated_batch_bytes = GATED_BATCH_BYTES
        #: Device staging of lease-free and speculative loads (allocated once, on first use).
        self.staging_bytes = SPECULATE_BYTES
        #: Arena bytes kept reserved ahead of stores (``gpu_pool.WritePool``); 0: none.
        self.write_ahead_bytes = DEFAULT_WRITE_AHEAD_BYTES
        #: Write-ahead stores commit in shrinking groups down to this many bytes (``commit_groups``).
        self.commit_tail_bytes = DEFAULT_COMMIT_TAIL_BYTES
        #: True: the write-ahead pool is refilled once a store's commits are answered (False, the
        #: default: as the store starts, its ReserveWrite served beside the commits; measured on
        #: an H100 only together with the commit groups, no gain).
        self.refill_after_commits = False
        # rANS lanes per segment of GPU-encoded stores (store_cuda(level=...)): 64 decodes with
        # twice the GPU parallelism of the format's default 32, for 1-2% more bytes
        self.coded_lanes = 64
        self._write_pool: WritePool | None = None
        self._touch_keys: list[bytes] = []
        self._touch_at = 0.0
        self._move_stream: Any = None
        self._extents: OrderedDict[bytes, tuple[int, int, int, bytes, bool]] = OrderedDict()  # + coded
        self._extents_lock = threading.Lock()
        # HBM pool extents seen through leases: key -> (offset, length, pool nonce, first
        # generation block, the blocks' counters then as bytes), for loads without a lease.
        self._pool_extents: OrderedDict[bytes, tuple[int, int, bytes, int, Any]] = OrderedDict()
        self._spec_buf: Any = None

    def pinned_u32(self, name: str, n: int):
        """A cached pinned int32 host buffer of at least ``n`` entries (pinned allocations are
        slow: made once, reused by every call)."""
        return self._cached_i32(self._pinned, name, n, pin_memory=True)

    def device_u32(self, name: str, n: int):
        """A cached int32 device buffer of at least ``n`` entries (made once, reused by every call)."""
        return self._cached_i32(self._device_bufs, name, n, device=self.device)

    @staticmethod
    def _cached_i32(cache: dict, name: str, n: int, **where):
        buf = cache.get(name)
        if buf is None or buf.numel() < n:
            buf = _torch().empty(max(n, 1024), dtype=_torch().int32, **where)
            cache[name] = buf
        return buf

    def write_pool(self, size: int) -> "WritePool | None":
        """The write-ahead pool for chunks of ``size`` bytes, or None (the daemon takes no
        unbound reservations, ``write_ahead_bytes`` is 0, or the arena is too small for it).
        A new arena (daemon restart) or chunk size starts a new pool."""
        c = self.client
        arena = c.arena
        target = min(self.write_ahead_bytes, (arena.size if arena is not None else 0) // 16)
        if not c.unbound_reservations or target < size:
            return None
        wp = self._write_pool
        pres = c.presence
        if wp is not None and (wp.size != size or wp.nonce != c.arena_nonce or (pres is not None and pres.stale())):
            wp.close()
            wp = None
        if wp is None:
            wp = self._write_pool = WritePool(c, size, target)
        return wp

    # ---- where chunks were last seen in the arena (speculative loads)
    def remember(self, extents: list[tuple[bytes, int, int, int]], nonce: bytes, coded: bool = False) -> None:
        """Records ``(key, offset, length, crc32c)`` of RAW (``coded``: CODEC bitstream) arena
        extents in the arena with ``nonce`` (bounded: the least recently seen go first)."""
        if not extents or not nonce:
            return
        with self._extents_lock:
            d = self._extents
            for key, off, length, crc in extents:
                d[key] = (off, length, crc, nonce, coded)
                d.move_to_end(key)
            while len(d) > MAX_REMEMBERED_EXTENTS:
                d.popitem(last=False)

    def recall(self, keys, nonce: bytes, length: int, limit: int) -> list[tuple[int, int, int]]:
        """``(offset, length, crc32c)`` of the leading run of ``keys`` (at most ``limit``) last
        seen as RAW extents of ``length`` bytes inside the arena with ``nonce``."""
        return self._recall(keys, nonce, limit, False, lambda n: n == length)

    def recall_coded(self, keys, nonce: bytes, limit: int) -> list[tuple[int, int, int]]:
        """``(offset, length, crc32c)`` of the leading run of ``keys`` (at most ``limit``) last
        seen as CODEC bitstreams inside the arena with ``nonce``."""
        return self._recall(keys, nonce, limit, True, lambda n: n > 0)

    def _recall(self, keys, nonce: bytes, limit: int, coded: bool, length_ok) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        arena = self.client.arena
        size = arena.size if arena is not None else 0
        with self._extents_lock:
            for key in keys[:limit]:
                e = self._extents.get(key)
                if e is None or e[3] != nonce or e[4] != coded or not length_ok(e[1]) or e[0] + e[1] > size:
                    break
                out.append(e[:3])
        return out

    def forget(self, key: bytes) -> None:
        """Drops ``key``'s remembered extent (it no longer holds the chunk)."""
        with self._extents_lock:
            self._extents.pop(key, None)
            self._pool_extents.pop(key, None)

    def remember_pool(self, extents: list[tuple[bytes, int, int]], pool: "HbmPoolMapping") -> None:
        """Records ``(key, offset, length)`` of HBM pool extents this client holds leases on,
        with the generation counters of their blocks now (while leased, their bytes are the
        chunk's). Nothing without the pool's counters."""
        if not extents or pool is None or pool.gens is None:
            return
        with self._extents_lock:
            d = self._pool_extents
            for key, off, length in extents:
                lo, hi = pool.blocks(off, length)
                d[key] = (off, length, self._pool_nonce, lo, pool.gens[lo:hi].tobytes())
                d.move_to_end(key)
            while len(d) > MAX_REMEMBERED_EXTENTS:
                d.popitem(last=False)

    def recall_pool(self, keys, limit: int) -> list[tuple[int, int, int, Any]]:
        """``(offset, length, first block, counters)`` of the leading run of ``keys`` (at most
        ``limit``) seen as extents of the pool mapped now."""
        out = []
        with self._extents_lock:
            for key in keys[:limit]:
                e = self._pool_extents.get(key)
                if e is None or e[2] != self._pool_nonce:
                    break
                out.append((e[0], e[1], e[3], e[4]))
        return out

    def touched(self, keys, now: float) -> None:
        """Chunks read without a lease: reported to the daemon in one touch-only RPC per
        ``TOUCH_INTERVAL_S`` (or ``TOUCH_PENDING_MAX`` keys), without waiting for it."""
        self._touch_keys.extend(keys)
        if len(self._touch_keys) >= TOUCH_PENDING_MAX or now - self._touch_at >= TOUCH_INTERVAL_S:
            self.flush_touches(now)

    def flush_touches(self, now: float = 0.0) -> None:
        keys, self._touch_keys = self._touch_keys, []
        self._touch_at = now
        if keys:
            try:
                self.client._touch_later(keys)
            except Exception as e:  # noqa: BLE001 - recency only: the chunks were read
                log.info("reporting lease-free reads failed: %s", e)

    @property
    def move_stream(self):
        """The stream that moves checked staging into destinations (lease-free loads)."""
        if self._move_stream is None:
            self._move_stream = _torch().cuda.Stream(self.device)
        return self._move_stream

    def spec_staging(self, nbytes: int):
        """Device staging for speculative loads (grown as needed, kept)."""
        torch = _torch()
        if self._spec_buf is None or self._spec_buf.numel() < nbytes:
            self._spec_buf = None
            self._spec_buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._spec_buf

    def pool(self) -> "HbmPoolMapping | None":
        """The daemon's HBM pool mapped into this process (once per pool: a new nonce, i.e. a
        restarted daemon, maps the new one), or None when the daemon exports none or it
        cannot be mapped here (another GPU without peer access: the arena path serves)."""
        exp = self.client.hbm
        if exp is None or not exp.ipc_handle:
            return None
        if self._pool is not None and self._pool_nonce == exp.nonce:
            return self._pool
        self._close_pool()
        from kvstore_native import cuda_ipc

        try:
            with _torch().cuda.device(self.device):
                self._pool = HbmPoolMapping.open(exp.ipc_handle, exp.pool_bytes,
                                                 getattr(exp, "generations_path", ""),
                                                 int(getattr(exp, "generation_block_bytes", 0)))
        except cuda_ipc.CudaError as e:
            log.info("the daemon's HBM pool (GPU %d) cannot be mapped on %s (%s); loads use the arena",
                     exp.device, self.device, e)
            self._pool = None
        self._pool_nonce = exp.nonce
        return self._pool

    def _close_pool(self) -> None:
        if self._pool is not None:
            try:
                self._pool.close()
            except Exception as e:  # noqa: BLE001 - the old daemon's pool may be gone already
                log.info("unmapping the old HBM pool failed: %s", e)
            self._pool = None

    def close(self) -> None:
        with self._lock:
            self.flush_touches()
        self._commits.shutdown(wait=True)
        if self._write_pool is not None:
            self._write_pool.close()
        self.client.drain(self.client.timeout_s)
        self._close_pool()

    # ---- helpers
    def _ensure_staging(self, nbytes: int) -> None:
        torch = _torch()
        if self._staging and self._staging[0].numel() >= nbytes:
            return
        self._staging = [torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                         for _ in range(self.staging_chunks)]
        self._staging_free = [None] * self.staging_chunks

    def _arena_ptr(self) -> int:
        arena = self.client.arena
        if arena is None or not arena.register_cuda():
            raise GpuPathUnusable("the GPU data path needs the same-host arena registered with CUDA")
        return int(arena.view(0, 0).ctypes.data) if arena.size else 0

    def _rpc_meta(self) -> dict:
        return dict(metadata=self.client._metadata, timeout=self.client.timeout_s)


def _path(client) -> GpuPath:
    gp = getattr(client, "_gpu_path", None)
    if gp is None:
        gp = GpuPath(client)
        client._gpu_path = gp
    return gp


def _groups(n: int, first: int, growth: int = 1) -> list[tuple[int, int]]:
    """The request split of one call: ``[0, first)``, then groups ``growth`` times larger than
    the one before (``growth`` 1: the rest in one group). The first answer comes back fast,
    and while group g's bytes cross PCIe the daemon serves (clears, leases) the larger g + 1."""
    first = max(1, min(first, n))
    out = [(0, first)]
    size = first
    while out[-1][1] < n:
        lo = out[-1][1]
        size = size * growth if growth > 1 else n - lo
        out.append((lo, min(n, lo + size)))
    return out


def commit_groups(n: int, size: int, tail_bytes: int) -> list[tuple[int, int]]:
    """The commit split of ``n`` write-ahead slots of ``size`` bytes: halves of what is left,
    each at least ``tail_bytes`` (0: one group), the last group holding the rest."""
    if n <= 0:
        return []
    least = n if tail_bytes <= 0 else max(1, -(-tail_bytes // max(1, size)))
    out: list[tuple[int, int]] = []
    lo = 0
    while lo < n:
        left = n - lo
        k = max(least, -(-left // 2))
        if left - k < least:
            k = left
        out.append((lo, lo + k))
        lo += k
    return out


def _rpc_errors(fn):
    """Maps gRPC failures to the client's exception classes (as the client's own methods do)."""
    import functools

    import grpc

    from .errors import from_rpc_error

    @functools.wraps(fn)
    def wrapper(client, *a, **kw):
        try:
            return fn(client, *a, **kw)
        except grpc.RpcError as e:
            raise from_rpc_error(e, client.addr) from None
    return wrapper


def _all_of(futures: list[Future]) -> Future:
    """A Future of the sum of ``futures``' results (the first exception wins)."""
    out: Future = Future()
    left = [len(futures)]
    lock = threading.Lock()
    if not futures:
        out.set_result(0)
        return out

    def done(_f):
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            try:
                out.set_result(sum(f.result() for f in futures))
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the Future
                out.set_exception(e)
    for f in futures:
        f.add_done_callback(done)
    return out
