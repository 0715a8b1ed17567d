"""The same-host data path (``kvstore.v1.LocalData``): descriptors and leases, no bytes.

A local client maps the DRAM arena (``Attach``), then reads chunks at the offsets a
``LeaseRead`` returns, or writes them into the extents a ``ReserveWrite`` returns and
publishes them with ``CommitWrite``. Every lease and reservation lives in ``LeaseTable``
until released or ``server.lease_ttl_s`` passes; the sweeper then releases it, so a client
that dies mid-transfer leaks nothing for longer than the TTL.

Threading: servicer methods run on the event loop; manager calls that may touch disk
(``lease_local``, ``commit_local``) run on the worker pool. ``LeaseTable`` is only touched
from the event loop (no lock needed); releasing a lease is cheap and non-blocking.
"""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor
import logging
import time
from dataclasses import dataclass, field

from kvstore_wire._proto.kvstore.v1 import local_pb2
from kvstore_wire.keys import KEY_BYTES

import kvstore_native as native
from ..errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from ..types import ChunkMeta, Durability, Encoding, KeyKind
from .auth import current_principal
from .data import chunk_ids

log = logging.getLogger(__name__)

#: How often expired leases are swept (seconds).
SWEEP_INTERVAL_S = 1.0


@dataclass(eq=False)
class _Lease:
    tenant_scope: str | None
    expires_s: float
    refs: list = field(default_factory=list)            # read leases (ChunkRef)
    reservations: list = field(default_factory=list)    # (slot index, Reservation, ChunkMeta)

    def release(self, manager) -> None:
        for r in self.refs:
            r.release()
        for _, res, _ in self.reservations:
            manager.abort_local(res)
        self.refs.clear()
        self.reservations.clear()


class LeaseTable:
    """Open leases by id. Event-loop thread only."""

    def __init__(self, manager, ttl_s: float, max_open: int, clock=time.time) -> None:
        self._m = manager
        self._ttl = ttl_s
        self._max = max_open
        self._clock = clock
        self._ids = itertools.count(1)
        self._open: dict[int, _Lease] = {}

    def __len__(self) -> int:
        return len(self._open)

    def open(self, lease: _Lease) -> int:
        if len(self._open) >= self._max:
            lease.release(self._m)
            raise ResourceExhausted(f"{self._max} same-host leases are open (server.max_open_leases); release "
                                    "leases after each transfer, or raise the limit")
        lid = next(self._ids)
        self._open[lid] = lease
        return lid

    def new(self) -> _Lease:
        return _Lease(current_principal().tenant_scope, self._clock() + self._ttl)

    def take(self, lease_id: int) -> _Lease:
        """Removes and returns the caller's lease; NOT_FOUND when unknown, expired or another tenant's."""
        lease = self._open.get(lease_id)
        if lease is None or (lease.tenant_scope is not None and lease.tenant_scope != current_principal().tenant_scope):
            raise NotFound(f"lease {lease_id} is unknown or expired (leases live server.lease_ttl_s={self._ttl:g} s); "
                           "ask for a new one")
        return self._open.pop(lease_id)

    def release(self, lease_id: int) -> bool:
        try:
            lease = self.take(lease_id)
        except NotFound:
            return False
        lease.release(self._m)
        return True

    def sweep(self) -> int:
        now = self._clock()
        expired = [lid for lid, lease in self._open.items() if lease.expires_s <= now]
        for lid in expired:
            self._open.pop(lid).release(self._m)
        if expired:
            log.info("reclaimed %d expired same-host leases", len(expired))
        return len(expired)

    def close(self) -> None:
        for lease in self._open.values():
            lease.release(self._m)
        self._open.clear()

    async def run_sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.sweep()


class LocalDataServicer:
    def __init__(self, manager, registry, config, pool, leases: LeaseTable) -> None:
        self._m = manager
        self._ns = registry
        self._cfg = config.server
        self._pool = pool
        self._leases = leases
        # Separate from the worker pool: _commit runs on a worker and waits for these.
        self._crc_pool = ThreadPoolExecutor(config.server.worker_threads, thread_name_prefix="kvstore-crc")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._crc_pool.shutdown(wait=True)

    def _namespace(self, namespace_id: bytes):
        return self._ns.get(namespace_id, current_principal().tenant_scope)

    async def Attach(self, request, context):
        if not current_principal().local_path:
            raise FailedPrecondition("this token may not use the same-host path (the shared arena holds every "
                                     "tenant's chunks); use the KVStore stream path, or give the token "
                                     "local_path = true if it belongs to a fully trusted co-located engine")
        dram = self._m.dram
        if dram.arena_path is None:
            raise FailedPrecondition("this daemon's DRAM arena is private (dram.shm_name is empty, or /dev/shm had "
                                     "no room); use the KVStore stream path, or set dram.shm_name = 'auto'")
        return local_pb2.AttachResponse(arena_path=str(dram.arena_path), arena_bytes=dram.arena_bytes,
                                        nonce=dram.nonce, nonce_offset=len(b"kvstore-arena-1\0"),
                                        lease_ttl_s=int(self._cfg.lease_ttl_s),
                                        index_path=str(self._m.presence.path) if self._m.presence else "")

    async def LeaseRead(self, request, context):
        info = self._namespace(request.namespace_id)
        cids = chunk_ids(info, request.keys, self._cfg.max_keys_per_request)
        lease = self._leases.new()
        extents = []
        try:
            # One worker hop for the whole request (a disk hit inside may block).
            got_all = await self._run(self._lease_all, cids)
            for i, got in enumerate(got_all):
                if got is None:
                    extents.append(local_pb2.Extent(index=i, found=False))
                    continue
                ref, offset, medium = got
                lease.refs.append(ref)
                m = ref.meta
                extents.append(local_pb2.Extent(index=i, found=True, offset=offset, length=m.payload_bytes,
                                                num_tokens=m.num_tokens, encoding=int(m.encoding),
                                                crc32c=m.crc32c, tier=int(medium), key_kind=int(m.key_kind)))
        except BaseException:
            lease.release(self._m)
            raise
        lid = self._leases.open(lease) if lease.refs else 0
        return local_pb2.LeaseReadResponse(lease_id=lid, extents=extents, expires_unix_s=lease.expires_s,
                                           arena_nonce=self._m.dram.nonce)

    def _lease_all(self, cids):
        """Worker thread: leases of the leading run of present chunks (a prefix ends at the
        first miss, so nothing after it is leased)."""
        out = []
        for cid in cids:
            got = self._m.lease_local(cid)
            out.append(got)
            if got is None:
                break
        return out + [None] * (len(cids) - len(out))

    async def ReserveWrite(self, request, context):
        info = self._namespace(request.namespace_id)
        ns = info.namespace
        if len(request.chunks) > self._cfg.max_keys_per_request:
            raise InvalidArgument(f"{len(request.chunks)} chunks in one request; the limit is "
                                  f"server.max_keys_per_request={self._cfg.max_keys_per_request}")
        lease = self._leases.new()
        slots = []
        try:
            for i, c in enumerate(request.chunks):
                where = f"chunks[{i}]"
                if len(c.key) != KEY_BYTES:
                    raise InvalidArgument(f"{where}: key is {len(c.key)} bytes; keys are {KEY_BYTES}-byte digests")
                if not 1 <= c.num_tokens <= ns.chunk_tokens:
                    raise InvalidArgument(f"{where}: num_tokens={c.num_tokens}, must be 1..{ns.chunk_tokens}")
                encoding = Encoding(c.encoding or Encoding.RAW)
                if encoding == Encoding.RAW and c.payload_bytes != ns.chunk_bytes(c.num_tokens):
                    raise InvalidArgument(f"{where}: payload_bytes={c.payload_bytes} but a RAW chunk of "
                                          f"{c.num_tokens} tokens is {ns.chunk_bytes(c.num_tokens)} bytes")
                if not 1 <= c.payload_bytes <= self._cfg.max_chunk_bytes:
                    raise InvalidArgument(f"{where}: payload_bytes must be 1..server.max_chunk_bytes")
                meta = ChunkMeta(num_tokens=c.num_tokens, encoding=encoding, payload_bytes=c.payload_bytes,
                                 crc32c=0, key_kind=KeyKind(c.key_kind or KeyKind.PREFIX))
                res = await self._run(self._m.reserve_local, info.namespace_id + c.key, c.payload_bytes)
                if res is None:
                    slots.append(local_pb2.Slot(index=i, exists=True))
                    continue
                lease.reservations.append((i, res, meta))
                slots.append(local_pb2.Slot(index=i, offset=res.offset, length=res.nbytes))
        except BaseException:
            lease.release(self._m)
            raise
        lid = self._leases.open(lease) if lease.reservations else 0
        return local_pb2.ReserveWriteResponse(lease_id=lid, slots=slots, expires_unix_s=lease.expires_s,
                                              arena_nonce=self._m.dram.nonce)

    def _commit(self, lease: _Lease, crcs: list[int], durability: Durability) -> tuple[int, int]:
        """Worker thread: verify each filled extent, then publish it. A bad chunk is dropped
        (its pages freed) and reported after the good ones are stored."""
        stored = existed = 0
        bad: list[str] = []
        # Checksums of all extents at once (native, GIL released): one pass over memory per
        # core instead of one core for the whole commit.
        crcs_got = list(self._crc_pool.map(lambda r: native.crc32c(r[1].view), lease.reservations))
        n = -1
        while lease.reservations:
            # Popped first: whatever happens next, the caller's release() never aborts it twice.
            i, res, meta = lease.reservations.pop(0)
            n += 1
            crc = crcs_got[n]
            want = crcs[n] if n < len(crcs) else 0
            if want and want != crc:
                self._m.abort_local(res)
                bad.append(f"chunks[{i}]: CRC32C {crc:#010x} of the written extent, the client said {want:#010x}")
                continue
            result = self._m.commit_local(res, meta.with_payload(meta.encoding, meta.payload_bytes, crc), durability)
            stored += result.name == "STORED"
            existed += result.name != "STORED"
        if bad:
            raise DataLoss("; ".join(bad) + ". Those chunks were not stored (the others were): the client wrote "
                           "different bytes than it checksummed, or wrote outside its extent")
        return stored, existed

    async def CommitWrite(self, request, context):
        lease = self._leases.take(request.lease_id)
        if request.crc32c and len(request.crc32c) != len(lease.reservations):
            lease.release(self._m)
            raise InvalidArgument(f"{len(request.crc32c)} checksums for {len(lease.reservations)} reserved slots; "
                                  "send one per slot that was not `exists`, in slot order, or none")
        try:
            durability = Durability(request.durability or Durability.MEMORY)
        except ValueError as e:
            lease.release(self._m)
            raise InvalidArgument(str(e)) from None
        try:
            stored, existed = await self._run(self._commit, lease, list(request.crc32c), durability)
        finally:
            lease.release(self._m)
        return local_pb2.CommitWriteResponse(stored=stored, existed=existed)

    async def Release(self, request, context):
        released = sum(1 for lid in request.lease_ids if self._leases.release(lid))
        return local_pb2.ReleaseResponse(released=released)
