"""The same-host data path (``kvstore.v1.LocalData``): descriptors and leases, no bytes.

A local client maps the DRAM arena (``Attach``), then reads chunks at the offsets a
``LeaseRead`` returns, or writes them into the extents a ``ReserveWrite`` returns and
publishes them with ``CommitWrite``. Every lease and reservation lives in ``LeaseTable``
until released or ``server.lease_ttl_s`` passes; the sweeper then releases it, so a client
that dies mid-transfer leaks nothing for longer than the TTL.

The servicer only translates: leases, reservations and commits are ``Store.local``'s
(``store.LocalAccess``), headers are checked by ``domain.chunks.validate_header`` (the same
rules as the stream Put).

Threading: servicer methods run on the event loop; store calls that may touch disk or wait
(``lease_run``, ``reserve``, ``commit``) run on the worker pool. ``LeaseTable`` is only touched
from the event loop (no lock needed); releasing a lease is cheap and non-blocking.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field

from kvstore_wire._proto.kvstore.v1 import local_pb2

from ..domain.chunks import ChunkHeader, chunk_ids, parse_durability, validate_header
from ..domain.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from ..config import QuotaConfig
from ..domain.types import Medium
from ..store import LocalAccess, Store
from ..quotas import QuotaLedger
from ..store.limits import Resource, TenantLimits
from .auth import current_principal

log = logging.getLogger(__name__)

#: Stands in for an unbound chunk's key while its header is checked.
_UNBOUND_KEY = bytes(32)
#: How often expired leases are swept (seconds).
SWEEP_INTERVAL_S = 1.0


@dataclass(eq=False)
class _Lease:
    """One lease id: read leases or reservations of one tenant, and what they count against
    that tenant's limits (given back by ``release``)."""

    tenant_scope: str | None
    tenant: str
    expires_s: float
    limits: TenantLimits
    refs: list = field(default_factory=list)            # read leases (ChunkRef)
    reservations: list = field(default_factory=list)    # (slot index, Reservation, ChunkMeta)
    held_leases: int = 0
    held_reservations: int = 0
    #: Reservations of unbound chunks (keys named at CommitWrite), in this namespace.
    unbound_in: object = None

    def hold(self, resource: Resource, n: int = 1) -> None:
        """Counts ``n`` open leases/reservations against the tenant (ResourceExhausted naming
        the config key when over its limit)."""
        self.limits.acquire(self.tenant, resource, n)
        if resource is Resource.OPEN_LEASES:
            self.held_leases += n
        else:
            self.held_reservations += n

    def unhold(self, resource: Resource, n: int = 1) -> None:
        self.limits.release(self.tenant, resource, n)
        if resource is Resource.OPEN_LEASES:
            self.held_leases -= n
        else:
            self.held_reservations -= n

    def release(self, local: LocalAccess) -> None:
        for r in self.refs:
            r.release()
        for _, res, _ in self.reservations:
            local.abort(res)
        self.refs.clear()
        self.reservations.clear()
        if self.held_leases:
            self.unhold(Resource.OPEN_LEASES, self.held_leases)
        if self.held_reservations:
            self.unhold(Resource.OPEN_RESERVATIONS, self.held_reservations)


class LeaseTable:
    """Open leases by id. Event-loop thread only."""

    def __init__(self, local: LocalAccess, ttl_s: float, max_open: int, clock=time.time,
                 limits: TenantLimits | None = None) -> None:
        self._m = local
        #: Per-tenant open leases and reservations (the store's ``TenantLimits``).
        self._limits = limits if limits is not None else QuotaLedger(QuotaConfig())
        self._ttl = ttl_s
        self._max = max_open
        self._clock = clock
        # Ids start at a random point: a client holding a lease of an earlier daemon (one that
        # restarted) cannot name a lease of this one by accident.
        self._ids = itertools.count(secrets.randbits(48) + 1)
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
        p = current_principal()
        return _Lease(p.tenant_scope, p.tenant, self._clock() + self._ttl, self._limits)

    def peek(self, lease_id: int) -> _Lease:
        """The caller's lease, left open; NOT_FOUND when unknown, expired or another tenant's."""
        lease = self._open.get(lease_id)
        if lease is None or (lease.tenant_scope is not None and lease.tenant_scope != current_principal().tenant_scope):
            raise NotFound(f"lease {lease_id} is unknown or expired (leases live server.lease_ttl_s={self._ttl:g} s); "
                           "ask for a new one")
        return lease

    def take(self, lease_id: int) -> _Lease:
        """Removes and returns the caller's lease; NOT_FOUND when unknown, expired or another tenant's."""
        self.peek(lease_id)
        return self._open.pop(lease_id)

    def renew(self, lease: _Lease) -> None:
        """Moves an open lease's expiry to ``server.lease_ttl_s`` from now (an unbound
        reservation kept for later CommitWrites)."""
        lease.expires_s = self._clock() + self._ttl

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


def _commit_options(request) -> tuple:
    """``(durability, take the CRC32Cs unread)`` of a CommitWrite; InvalidArgument for an
    unknown durability."""
    return parse_durability(request.durability), request.skip_verify or current_principal().trust_client_crc


class LocalDataServicer:
    def __init__(self, store: Store, config, pool, leases: LeaseTable) -> None:
        self._store = store
        self._m = store.local
        self._cfg = config.server
        self._pool = pool
        self._leases = leases
        #: The daemon's ``control.ControlServer`` (set by ``app.Daemon``): Attach hands out its
        #: socket and a ticket when it runs.
        self.control = None

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _namespace(self, namespace_id: bytes):
        return self._store.namespace(namespace_id, current_principal().tenant_scope)

    async def Attach(self, request, context):
        if not current_principal().local_path:
            raise FailedPrecondition("this token may not use the same-host path (the shared arena holds every "
                                     "tenant's chunks); use the KVStore stream path, or give the token "
                                     "local_path = true if it belongs to a fully trusted co-located engine")
        a = self._m.attach()
        pool = self._m.device_export()   # the HBM tier's pool, when the chain has one
        hbm = None if pool is None else local_pb2.HbmPool(ipc_handle=pool.ipc_handle, pool_bytes=pool.pool_bytes,
                                                          device=pool.device, nonce=pool.nonce,
                                                          generations_path=pool.generations_path,
                                                          generation_block_bytes=pool.generation_block_bytes)
        control = self.control
        ctl_path, ticket = ("", b"")
        if control is not None and control.running:
            ctl_path, ticket = str(control.path), control.ticket(current_principal())
        return local_pb2.AttachResponse(arena_path=str(a.path), arena_bytes=a.nbytes, nonce=a.nonce,
                                        nonce_offset=a.nonce_offset, lease_ttl_s=int(self._cfg.lease_ttl_s),
                                        index_path=str(a.index_path) if a.index_path is not None else "",
                                        hbm=hbm, unbound_reservations=True, control_socket=ctl_path,
                                        control_ticket=ticket)

    async def LeaseRead(self, request, context):
        info = self._namespace(request.namespace_id)
        cids = chunk_ids(info, request.keys, self._cfg.max_keys_per_request)
        if request.touch_only:   # read already, without a lease: hits and recency only
            found = await self._run(self._m.touch, cids)   # a worker: the tier lock may be busy evicting
            return local_pb2.LeaseReadResponse(extents=[local_pb2.Extent(index=i, found=f) for i, f in enumerate(found)],
                                               arena_nonce=self._m.nonce)
        lease = self._leases.new()
        extents = []
        lease.hold(Resource.OPEN_LEASES)   # before anything is leased: over the limit, nothing is
        try:
            # One worker hop for the whole request (a disk hit inside may block). With
            # device_pool, the leading run the HBM tier holds comes as pool extents first.
            dev = await self._run(self._m.device_lease_run, cids) if request.device_pool else []
            for i, d in enumerate(dev):
                lease.refs.append(d)
                m = d.meta
                extents.append(local_pb2.Extent(index=i, found=True, offset=d.offset, length=m.payload_bytes,
                                                num_tokens=m.num_tokens, encoding=int(m.encoding), crc32c=m.crc32c,
                                                tier=int(Medium.HBM), key_kind=int(m.key_kind), in_device_pool=True))
            got_all = (await self._run(self._m.lease_run, cids[len(dev):], request.client_verifies)
                       if len(dev) < len(cids) else [])
            for i, got in enumerate(got_all, start=len(dev)):
                if got is None:
                    extents.append(local_pb2.Extent(index=i, found=False))
                    continue
                lease.refs.append(got.ref)
                m = got.ref.meta
                extents.append(local_pb2.Extent(index=i, found=True, offset=got.offset, length=m.payload_bytes,
                                                num_tokens=m.num_tokens, encoding=int(m.encoding),
                                                crc32c=m.crc32c, tier=int(got.found_in), key_kind=int(m.key_kind)))
        except BaseException:
            lease.release(self._m)
            raise
        if not lease.refs:
            lease.release(self._m)
        lid = self._leases.open(lease) if lease.refs else 0
        return local_pb2.LeaseReadResponse(lease_id=lid, extents=extents, expires_unix_s=lease.expires_s,
                                           arena_nonce=self._m.nonce, device_pool_nonce=self._m.device_nonce)

    async def ReserveWrite(self, request, context):
        info = self._namespace(request.namespace_id)
        if len(request.chunks) > self._cfg.max_keys_per_request:
            raise InvalidArgument(f"{len(request.chunks)} chunks in one request; the limit is "
                                  f"server.max_keys_per_request={self._cfg.max_keys_per_request}")
        keyless = [not c.key for c in request.chunks]
        if any(keyless) and not all(keyless):
            raise InvalidArgument("a ReserveWrite's chunks are all keyed or all unbound (empty keys, bound at "
                                  "CommitWrite); split the request")
        unbound = bool(keyless) and keyless[0]
        lease = self._leases.new()
        slots = []
        try:
            checked = [validate_header(info, ChunkHeader(c.key or _UNBOUND_KEY, c.num_tokens, c.payload_bytes,
                                                         c.encoding, c.key_kind),
                                       self._cfg.max_chunk_bytes, f"chunks[{i}]") for i, c in enumerate(request.chunks)]
            if unbound:
                lease.unbound_in = info
                checked = [(self._m.unbound_id(info.namespace_id), meta) for _, meta in checked]
            lease.hold(Resource.OPEN_RESERVATIONS, len(checked))   # before the pages are taken
            # One worker hop for the whole request; the extents are zeroed in parallel there.
            got = await self._run(self._m.reserve_many, [(cid, c.payload_bytes)
                                                         for (cid, _), c in zip(checked, request.chunks)])
            for i, ((_, meta), res) in enumerate(zip(checked, got)):
                if res is None:   # stored already, or being written by another request
                    lease.unhold(Resource.OPEN_RESERVATIONS)
                    slots.append(local_pb2.Slot(index=i, exists=True))
                    continue
                lease.reservations.append((i, res, meta))
                slots.append(local_pb2.Slot(index=i, offset=res.offset, length=res.nbytes))
        except BaseException:
            lease.release(self._m)
            raise
        lid = self._leases.open(lease) if lease.reservations else 0
        return local_pb2.ReserveWriteResponse(lease_id=lid, slots=slots, expires_unix_s=lease.expires_s,
                                              arena_nonce=self._m.nonce)

    async def CommitWrite(self, request, context):
        if request.keep_lease:
            lease = self._leases.peek(request.lease_id)
            if lease.unbound_in is not None:
                return await self._commit_kept(request, lease)
        lease = self._leases.take(request.lease_id)
        try:
            durability, trust = _commit_options(request)
            if lease.unbound_in is None:
                if request.bindings or request.keep_lease:
                    raise InvalidArgument(f"lease {request.lease_id} reserved keyed chunks: commit it with crc32c "
                                          "(bindings and keep_lease are for unbound reservations)")
            else:
                bound = self._bindings(lease, request)
        except BaseException:
            lease.release(self._m)
            raise
        if lease.unbound_in is None:
            try:
                stored, existed = await self._run(self._m.commit_many, lease.reservations, list(request.crc32c),
                                                  durability, trust)
            finally:
                lease.release(self._m)
            return local_pb2.CommitWriteResponse(stored=stored, existed=existed)
        lease.unhold(Resource.OPEN_RESERVATIONS, len(bound))
        lease.release(self._m)     # the slots not bound are given back now
        return await self._commit_bound(bound, durability, trust)

    async def _commit_kept(self, request, lease: _Lease):
        """A CommitWrite with ``keep_lease`` on an unbound reservation (``lease``, still open):
        the bound slots are taken out of the lease at once (on the event loop, so commits of
        other slots of the same lease may run concurrently), the lease stays open with the
        rest, renewed, and ends when no slot is left. An invalid request ends the lease."""
        lid = request.lease_id
        try:
            durability, trust = _commit_options(request)
            bound = self._bindings(lease, request)
        except BaseException:
            self._leases.release(lid)
            raise
        lease.unhold(Resource.OPEN_RESERVATIONS, len(bound))   # theirs now: committed or given back below
        if lease.reservations:
            self._leases.renew(lease)
        else:
            self._leases.release(lid)
        try:
            return await self._commit_bound(bound, durability, trust)
        except BaseException:
            self._leases.release(lid)   # (if still open) the writer learns of the failure; the rest goes back
            raise

    async def _commit_bound(self, bound: list, durability, trust: bool):
        try:
            stored, existed, existed_slots = await self._run(self._m.commit_bound, bound, durability, trust)
        finally:
            for _, res, *_ in bound:   # not reached (an error inside): given back
                self._m.abort(res)
        return local_pb2.CommitWriteResponse(stored=stored, existed=existed, existed_slots=existed_slots)

    def _bindings(self, lease: _Lease, request) -> list:
        """The unbound reservations a CommitWrite binds, taken out of ``lease``: ``(slot index,
        reservation, meta, chunk id, crc32c)`` in the request's order. InvalidArgument (nothing
        bound; the caller ends the lease) for checksums sent the keyed way, an unknown or
        repeated slot, or a malformed key."""
        if request.crc32c:
            raise InvalidArgument("an unbound reservation is committed with bindings (slot, key, crc32c), not "
                                  "crc32c")
        info = lease.unbound_in
        by_slot = {i: n for n, (i, _, _) in enumerate(lease.reservations)}
        picked: list[int] = []
        seen: set[int] = set()
        for j, b in enumerate(request.bindings):
            if b.slot not in by_slot or b.slot in seen:
                raise InvalidArgument(f"bindings[{j}]: slot {b.slot} is not an open slot of lease "
                                      f"{request.lease_id} (unknown, given back, or bound twice)")
            seen.add(b.slot)
            picked.append(by_slot[b.slot])
        cids = chunk_ids(info, [b.key for b in request.bindings], self._cfg.max_keys_per_request)
        out = [(*lease.reservations[n], cid, b.crc32c) for n, cid, b in zip(picked, cids, request.bindings)]
        taken = set(picked)
        lease.reservations[:] = [r for n, r in enumerate(lease.reservations) if n not in taken]
        return out

    async def Release(self, request, context):
        released = sum(1 for lid in request.lease_ids if self._leases.release(lid))
        return local_pb2.ReleaseResponse(released=released)
