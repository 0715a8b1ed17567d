"""The admin-plane servicer (``kvstore.v1.Admin``). Every RPC needs an admin principal
(enforced by the interceptor). Manager calls that may touch the disk run on the worker pool."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor

from kvstore_wire._proto.kvstore.v1 import admin_pb2
from kvstore_wire.keys import KEY_BYTES

from .. import __version__
from ..errors import FailedPrecondition, InvalidArgument, NotFound
from ..namespaces import NamespaceRegistry
from ..types import Medium
from . import convert
from .data import chunk_ids

DEFAULT_PAGE = 100
MAX_PAGE = 10_000


class AdminServicer:
    def __init__(self, manager, registry: NamespaceRegistry, config, pool: Executor) -> None:
        self._m = manager
        self._ns = registry
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
        st = self._m.stats()
        return admin_pb2.GetStatsResponse(
            tiers=[convert.tier_stats(t) for t in st.tiers], version=__version__,
            uptime_s=time.time() - self._started, namespaces=len(self._ns),
            write_queue_depth=st.write_queue_depth, write_queue_dropped=st.write_queue_dropped)

    async def ListNamespaces(self, request, context):
        return admin_pb2.ListNamespacesResponse(
            namespaces=[convert.namespace_info(i) for i in self._ns.list(self._scope())])

    async def ListKeys(self, request, context):
        if request.namespace_id:
            self._ns.get(request.namespace_id, self._scope())
        limit = min(request.limit or DEFAULT_PAGE, MAX_PAGE)
        medium = self._tier(request.tier)
        infos = await self._run(lambda: self._m.entries(prefix=bytes(request.namespace_id), medium=medium,
                                                        after=bytes(request.page_token), limit=limit + 1))
        more = len(infos) > limit
        infos = infos[:limit]
        return admin_pb2.ListKeysResponse(entries=[convert.key_entry(i) for i in infos],
                                          next_page_token=bytes(infos[-1].cid) if more and infos else b"")

    async def Inspect(self, request, context):
        info = self._ns.get(request.namespace_id, self._scope())
        (cid,) = chunk_ids(info, [request.key], 1)
        ki = await self._run(self._m.inspect, cid)
        if ki is None:
            raise NotFound(f"key {request.key.hex()} is not stored in namespace {info.namespace_id.hex()[:16]}...")
        return admin_pb2.InspectResponse(entry=convert.key_entry(ki), namespace=convert.namespace_info(info))

    async def Evict(self, request, context):
        medium = self._tier(request.tier)
        if request.keys:
            info = self._ns.get(request.namespace_id, self._scope())
            cids = chunk_ids(info, request.keys, self._cfg.max_keys_per_request)
            n = await self._run(lambda: self._m.evict(cids, medium))
        elif request.namespace_id:
            raise InvalidArgument("evicting a whole namespace is Clear(namespace_id); Evict takes keys, or "
                                  "no keys and a tier to empty that tier")
        elif medium is None:
            raise InvalidArgument("Evict needs keys, or a tier to empty (kvctl evict --tier dram)")
        else:
            n = await self._run(lambda: self._m.evict(None, medium))
        return admin_pb2.EvictResponse(evicted=n)

    def _cids(self, request) -> list[bytes]:
        info = self._ns.get(request.namespace_id, self._scope())
        return chunk_ids(info, request.keys, self._cfg.max_keys_per_request)

    async def Pin(self, request, context):
        cids = self._cids(request)
        return admin_pb2.PinResponse(pinned=sum(1 for c in cids if self._m.pin(c, request.ttl_s)))

    async def Unpin(self, request, context):
        cids = self._cids(request)
        return admin_pb2.UnpinResponse(unpinned=sum(1 for c in cids if self._m.unpin(c)))

    async def Clear(self, request, context):
        scope = request.WhichOneof("scope")
        if scope == "namespace_id":
            if len(request.namespace_id) != KEY_BYTES:
                raise InvalidArgument(f"namespace_id must be {KEY_BYTES} bytes")
            info = self._ns.get(request.namespace_id, self._scope())
            n = await self._run(self._m.delete_prefix, info.namespace_id)
        elif scope == "tenant":
            infos = self._ns.list(request.tenant)
            n = 0
            for info in infos:
                n += await self._run(self._m.delete_prefix, info.namespace_id)
            self._ns.remove(i.namespace_id for i in infos)
        else:
            raise InvalidArgument("Clear needs a scope: namespace_id or tenant")
        return admin_pb2.ClearResponse(deleted=n)

    async def Verify(self, request, context):
        """Scrubs the disk tier now, streaming progress (the disk tier does the checking)."""
        disk = getattr(self._m, "disk", None)
        if disk is None or not hasattr(disk, "scrub"):
            raise FailedPrecondition("the disk tier is off (disk.enabled = false): nothing to verify")
        loop, updates = asyncio.get_running_loop(), asyncio.Queue()
        report = lambda r: loop.call_soon_threadsafe(updates.put_nowait, admin_pb2.VerifyProgress(  # noqa: E731
            total=r.total, checked=r.checked, corrupt=r.corrupt, bytes_checked=r.bytes_checked,
            seconds=r.seconds, done=r.done))
        job = loop.run_in_executor(self._pool, disk.scrub, report)
        while not job.done() or not updates.empty():
            getter = asyncio.ensure_future(updates.get())
            await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            yield getter.result()
        await job   # raises what the scrub raised (a failing disk)
