"""Asynchronous client (``grpc.aio``): the ``_core`` plans driven with awaited RPCs.

Same methods and behaviour as ``KVStoreClient``, awaited, including the same-host path
(shared arena, presence index) and ``retrieve_into``:

    async with await AsyncKVStoreClient.connect("127.0.0.1:50051", ns) as c:
        await c.store(tokens, kv)
        n = await c.retrieve_into(tokens, out)

Memory work (copies into and out of the arena, CRCs of outgoing chunks) runs on a worker
thread (``asyncio.to_thread``) so the event loop never stalls on a copy; presence lookups
are a few memory probes and run inline (no thread hop, no RPC).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Mapping, Sequence

import grpc

from kvstore_wire._proto.kvstore.v1 import local_pb2
from kvstore_wire.keys import Namespace
from kvstore_wire.types import Durability, Tier

from . import _core, _views
from ._common import LookupResult
from ._steps import Call, Stream, Upload, Work, bind_stubs, open_client_channel
from kvstore_wire.channel import TlsOptions
from .errors import from_rpc_error
from .gpu_route import GpuRoute

log = logging.getLogger(__name__)


class AsyncKVStoreClient:
    """One namespace on one daemon, for one event loop. Build it with ``await connect(...)``."""

    def __init__(self, addr: str, token: str | None = None, timeout_s: float | None = 60.0, *,
                 local: bool | None = None, copy_threads: int | None = None, tls: TlsOptions | None = None) -> None:
        """Use ``await AsyncKVStoreClient.connect(...)`` (this only prepares the channel).
        ``tls``: as for ``KVStoreClient``."""
        self.addr = addr
        self.timeout_s = timeout_s
        self._metadata, self._channel = open_client_channel(addr, token, tls, aio=True)
        self._releases: set[asyncio.Task] = set()
        self._core = _core.ClientCore(addr, local=local, copy_threads=copy_threads, release_later=self._release_later)
        self._core.gpu = GpuRoute(self)   # CUDA tensors: the GPU data path, on a worker thread
        self._rpc = bind_stubs(self._channel)
        self._credentials = (token, tls)
        self._blocking: tuple | None = None   # (channel, stubs) for the GPU path, opened on first use

    @classmethod
    async def connect(cls, addr: str, namespace: Namespace | Mapping[str, Any], token: str | None = None,
                      timeout_s: float | None = 60.0, local: bool | None = None,
                      copy_threads: int | None = None, tls: TlsOptions | None = None) -> "AsyncKVStoreClient":
        """Registers the namespace and, per ``local`` (as in ``KVStoreClient``), maps the
        daemon's arena and presence index."""
        self = cls(addr, token, timeout_s, local=local, copy_threads=copy_threads, tls=tls)
        try:
            await self._run(self._core.connect(namespace))
        except BaseException:
            self._core.close()
            await self._channel.close()
            raise
        return self

    # ------------------------------------------------------------------ driver
    async def _run(self, plan):
        """``KVStoreClient._run`` with awaited steps."""
        try:
            result, error = None, None
            while True:
                try:
                    step = plan.throw(error) if error is not None else plan.send(result)
                except StopIteration as stop:
                    return stop.value
                result, error = None, None
                try:
                    result = await self._do(step)
                except BaseException as e:  # noqa: BLE001 - handed to the plan, which re-raises
                    error = e
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.addr) from None
        finally:
            plan.close()

    async def _do(self, step):
        if isinstance(step, Work):
            return await asyncio.to_thread(step.fn, *step.args)
        if isinstance(step, Call):
            return await self._rpc[step.rpc](step.request, metadata=self._metadata, timeout=self.timeout_s)
        if isinstance(step, Stream):
            call = self._rpc[step.rpc](step.request, metadata=self._metadata, timeout=self.timeout_s)
            try:
                async for msg in call:
                    if not step.feed(msg):
                        break
            finally:
                call.cancel()   # no-op once the stream has ended
            return None
        if isinstance(step, Upload):
            return await self._rpc[step.rpc](iter(step.messages), metadata=self._metadata, timeout=self.timeout_s)
        raise TypeError(f"unknown plan step {step!r}")

    # ------------------------------------------------------------------ session
    @property
    def namespace(self) -> Namespace:
        return self._core.namespace

    @property
    def namespace_id(self) -> bytes:
        return self._core.namespace_id

    @property
    def piece_bytes(self) -> int:
        return self._core.piece_bytes

    @property
    def arena(self):
        return self._core.arena

    @property
    def presence(self):
        return self._core.presence

    @property
    def transport(self) -> str:
        """``"shm"`` (same-host shared memory) or ``"grpc"`` (streamed)."""
        return self._core.transport

    @property
    def crc_backend(self) -> str:
        return _core.crc_backend()

    def keys(self, tokens: Sequence[int], include_partial: bool = False) -> list[bytes]:
        """See ``KVStoreClient.keys``."""
        return self._core.keys(tokens, include_partial)

    def tail_tokens(self, tokens: Sequence[int]) -> int:
        """See ``KVStoreClient.tail_tokens``."""
        return self._core.tail_tokens(tokens)

    def storable_tokens(self, tokens: Sequence[int], kv=None) -> int:
        """See ``KVStoreClient.storable_tokens``."""
        return self._core.storable_tokens(tokens, kv)

    # ------------------------------------------------------------------ data plane
    async def exists(self, keys: Sequence[bytes]) -> list[Tier]:
        return await self._run(self._core.exists(keys))

    async def store(self, tokens: Sequence[int], kv, durability: Durability = Durability.MEMORY,
                    include_partial: bool = False) -> int:
        """See ``KVStoreClient.store``: returns the number of chunks newly stored."""
        return await self._run(self._core.store(tokens, kv, durability, include_partial))

    async def lookup(self, tokens: Sequence[int], pin_ttl_s: int = 0, include_partial: bool = False) -> LookupResult:
        """See ``KVStoreClient.lookup``."""
        return await self._run(self._core.lookup(tokens, pin_ttl_s, include_partial))

    async def lookup_keys(self, keys: Sequence[bytes], pin_ttl_s: int = 0) -> LookupResult:
        return await self._run(self._core.lookup_keys(keys, pin_ttl_s))

    async def retrieve(self, tokens: Sequence[int], as_torch: bool = False, verify_crc: bool | None = None,
                       include_partial: bool = False):
        """See ``KVStoreClient.retrieve``."""
        return await self._run(self._core.retrieve(tokens, as_torch, verify_crc, include_partial))

    async def retrieve_into(self, tokens: Sequence[int], out, verify_crc: bool | None = None) -> int:
        """See ``KVStoreClient.retrieve_into``."""
        return await self._run(self._core.retrieve_into(tokens, out, verify_crc))

    async def delete(self, keys: Sequence[bytes]) -> int:
        return await self._run(self._core.delete(keys))

    @asynccontextmanager
    async def leased_views(self, keys: Sequence[bytes], verify_crc: bool | None = None,
                           last_tokens: int = 0) -> AsyncIterator[_views.LeasedViews]:
        """See ``KVStoreClient.leased_views``."""
        lv = await self._run(_views.lease_views(self._core, list(keys), verify_crc, last_tokens))
        try:
            yield lv
        finally:
            lv.chunks = []
            self._release_later(lv.lease_id)

    # ------------------------------------------------------------------ leases
    def _release_later(self, lease_id: int) -> None:
        """Ends a lease in a background task (the caller does not wait for the answer); if it
        never arrives, the lease expires after server.lease_ttl_s. Called on the loop's thread."""
        if not lease_id:
            return
        task = asyncio.get_running_loop().create_task(self._release(lease_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, lease_id: int) -> None:
        try:
            await self._rpc["release"](local_pb2.ReleaseRequest(lease_ids=[lease_id]), metadata=self._metadata,
                                       timeout=self.timeout_s)
        except grpc.RpcError as e:
            log.info("releasing lease %d failed (%s); it expires on the daemon by itself", lease_id, e.code())

    def _blocking_stubs(self) -> dict:
        """Sync stubs on a second channel (same address and credentials) for the GPU data
        path, which runs blocking on a worker thread and pipelines with ``.future()`` calls."""
        if self._blocking is None:
            _, channel = open_client_channel(self.addr, *self._credentials)
            self._blocking = (channel, bind_stubs(channel))
        return self._blocking[1]

    async def close(self) -> None:
        """Waits for pending lease releases, unmaps the arena and closes the channels."""
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        await asyncio.to_thread(self._core.gpu.close)   # waits for background GPU commits
        self._core.close()
        if self._blocking is not None:
            self._blocking[0].close()
        await self._channel.close()

    async def __aenter__(self) -> "AsyncKVStoreClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
