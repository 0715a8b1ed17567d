"""The admin-plane servicer (``kvstore.v1.Admin``): protobuf <-> domain over the ``Store``.
Every RPC needs an admin principal (enforced by the interceptor). Store calls that may touch
the disk run on the worker pool."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor

from kvstore_wire._proto.kvstore.v1 import admin_pb2
from kvstore_wire.keys import KEY_BYTES

from .. import __version__
from ..domain.chunks import chunk_ids
from ..domain.errors import InvalidArgument, NotFound
from ..domain.types import Medium
from ..store import Store
from . import convert

DEFAULT_PAGE = 100
MAX_PAGE = 10_000


class AdminServicer:
    def __init__(self, store: Store, config, pool: Executor) -> None:
        self._store = store
        self._ns = store.namespaces
        self._cfg = config.server
        self._pool = pool
        self._started = time.time()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _scope(self) -> str | None:
        # An admin token administers the whole daemon; the tenant it carries does not narrow it.
        return None

    @staticmethod
    def _tier(value: int) -> Medium | None:
        try:
            return convert.medium_or_none(value)
        except ValueError:
            raise InvalidArgument(f"unknown tier {value}") from None

    async def GetStats(self, request, context):
        st = self._store.stats()
        chain = st.chain
        return admin_pb2.GetStatsResponse(
            tiers=[convert.tier_stats(t) for t in chain.tiers], version=__version__,
            uptime_s=time.time() - self._started, namespaces=st.namespaces,
            write_queue_depth=chain.write_queue_depth, write_queue_dropped=chain.write_queue_dropped,
            tenants=convert.tenant_usage(st.tenants),
            **convert.remote_status(self._store.remote_status.status()))

    async def ListNamespaces(self, request, context):
        return admin_pb2.ListNamespacesResponse(
            namespaces=[convert.namespace_info(i) for i in self._ns.list(self._scope())])

    async def ListKeys(self, request, context):
        if request.namespace_id:
            self._ns.get(request.namespace_id, self._scope())
        limit = min(request.limit or DEFAULT_PAGE, MAX_PAGE)
        medium = self._tier(request.tier)
        infos = await self._run(lambda: self._store.entries(prefix=bytes(request.namespace_id), medium=medium,
                                                        after=bytes(request.page_token), limit=limit + 1))
        more = len(infos) > limit
        infos = infos[:limit]
        return admin_pb2.ListKeysResponse(entries=[convert.key_entry(i) for i in infos],
                                          next_page_token=bytes(infos[-1].cid) if more and infos else b"")

    async def Inspect(self, request, context):
        info = self._ns.get(request.namespace_id, self._scope())
        (cid,) = chunk_ids(info, [request.key], 1)
        ki = await self._run(self._store.inspect, cid)
        if ki is None:
            raise NotFound(f"key {request.key.hex()} is not stored in namespace {info.namespace_id.hex()[:16]}...")
        return admin_pb2.InspectResponse(entry=convert.key_entry(ki), namespace=convert.namespace_info(info))

    async def Evict(self, request, context):
        medium = self._tier(request.tier)
        if request.keys:
            info = self._ns.get(request.namespace_id, self._scope())
            cids = chunk_ids(info, request.keys, self._cfg.max_keys_per_request)
            n = await self._run(lambda: self._store.evict(cids, medium))
        elif request.namespace_id:
            raise InvalidArgument("evicting a whole namespace is Clear(namespace_id); Evict takes keys, or "
                                  "no keys and a tier to empty that tier")
        elif medium is None:
            raise InvalidArgument("Evict needs keys, or a tier to empty (kvctl evict --tier dram)")
        else:
            n = await self._run(lambda: self._store.evict(None, medium))
        return admin_pb2.EvictResponse(evicted=n)

    def _cids(self, request) -> list[bytes]:
        info = self._ns.get(request.namespace_id, self._scope())
        return chunk_ids(info, request.keys, self._cfg.max_keys_per_request)

    async def Pin(self, request, context):
        cids = self._cids(request)
        return admin_pb2.PinResponse(pinned=self._store.pin(cids, request.ttl_s))

    async def Unpin(self, request, context):
        cids = self._cids(request)
        return admin_pb2.UnpinResponse(unpinned=self._store.unpin(cids))

    async def Clear(self, request, context):
        scope = request.WhichOneof("scope")
        if scope == "namespace_id":
            if len(request.namespace_id) != KEY_BYTES:
                raise InvalidArgument(f"namespace_id must be {KEY_BYTES} bytes")
            info = self._ns.get(request.namespace_id, self._scope())
            n = await self._run(self._store.clear_namespace, info.namespace_id)
        elif scope == "tenant":
            n = await self._run(self._store.clear_tenant, request.tenant)
        else:
            raise InvalidArgument("Clear needs a scope: namespace_id or tenant")
        return admin_pb2.ClearResponse(deleted=n)

    async def Verify(self, request, context):
        """Scrubs every tier that keeps chunks at rest now, streaming progress."""
        loop, updates = asyncio.get_running_loop(), asyncio.Queue()
        report = lambda r: loop.call_soon_threadsafe(updates.put_nowait, admin_pb2.VerifyProgress(  # noqa: E731
            total=r.total, checked=r.checked, corrupt=r.corrupt, bytes_checked=r.bytes_checked,
            seconds=r.seconds, done=r.done))
        job = loop.run_in_executor(self._pool, self._store.scrub, report)
        while not job.done() or not updates.empty():
            getter = asyncio.ensure_future(updates.get())
            await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            yield getter.result()
        await job   # raises what the scrub raised (a failing disk)
