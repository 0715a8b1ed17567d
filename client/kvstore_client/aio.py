"""Asynchronous client (``grpc.aio``), same API as ``KVStoreClient`` with ``await``.

    client = await AsyncKVStoreClient.connect("127.0.0.1:50051", ns)
    hit = await client.lookup(tokens)
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Mapping, Sequence

import grpc

from . import _common as C
from kvstore_wire._proto.kvstore.v1 import data_pb2, local_pb2
from .client import bind_stubs, secure_channel
from kvstore_wire.channel import TlsOptions
from .errors import from_rpc_error
from kvstore_wire.keys import Namespace, prefix_keys
from kvstore_wire.presence import PresenceReader
from kvstore_wire.types import Durability, Tier



def _translating(fn):
    @functools.wraps(fn)
    async def wrapper(self, *a, **kw):
        try:
            return await fn(self, *a, **kw)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.addr) from None
    return wrapper


class AsyncKVStoreClient:
    def __init__(self, addr: str, token: str | None = None, timeout_s: float | None = 60.0,
                 tls: TlsOptions | None = None) -> None:
        """Use ``await AsyncKVStoreClient.connect(...)``."""
        self.addr = addr
        self.timeout_s = timeout_s
        self._metadata, self._channel = secure_channel(addr, token, tls, aio=True)
        bind_stubs(self, self._channel)
        self.presence: PresenceReader | None = None
        self._get_encoding = 0 if C.codec_available() else 1  # 1 = RAW: the daemon decodes

    @classmethod
    async def connect(cls, addr: str, namespace: Namespace | Mapping[str, Any], token: str | None = None,
                      timeout_s: float | None = 60.0, local: bool = True,
                      tls: TlsOptions | None = None) -> "AsyncKVStoreClient":
        """``local=False``: never read the same-host presence index (lookups are RPCs).
        ``tls``: as for ``KVStoreClient``."""
        self = cls(addr, token, timeout_s, tls)
        try:
            await self._connect(C.as_namespace(namespace))
            if local:
                await self._attach_presence()
        except BaseException:
            await self._channel.close()
            raise
        return self

    @_translating
    async def _connect(self, ns: Namespace) -> None:
        resp = await self._register(data_pb2.RegisterNamespaceRequest(spec=C.spec_of(ns)), metadata=self._metadata,
                                    timeout=self.timeout_s)
        reg = C.registration(ns, resp)
        self.namespace, self.namespace_id, self.piece_bytes = reg.namespace, reg.namespace_id, reg.piece_bytes

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        return prefix_keys(self.namespace_id, tokens, self.namespace.chunk_tokens)

    @_translating
    async def exists(self, keys: Sequence[bytes]) -> list[Tier]:
        resp = await self._exists(data_pb2.ExistsRequest(namespace_id=self.namespace_id, keys=list(keys)),
                                  metadata=self._metadata, timeout=self.timeout_s)
        return [Tier(t) for t in resp.tiers]

    @_translating
    async def store(self, tokens: Sequence[int], kv, durability: Durability = Durability.MEMORY) -> int:
        ns = self.namespace
        u8 = C.kv_bytes_array(kv, ns)
        keys = self.keys(tokens)
        n = min(len(keys), u8.shape[C.token_axis(ns)] // ns.chunk_tokens)
        if n == 0:
            return 0
        present = await self.exists(keys[:n])
        todo = [i for i in range(n) if present[i] == Tier.NONE]
        if not todo:
            return 0
        payloads = await asyncio.to_thread(C.chunk_payloads, u8, ns, n)
        msgs = C.put_messages(self.namespace_id, [keys[i] for i in todo], [payloads[i] for i in todo], ns,
                              Durability(durability), self.piece_bytes)
        resp = await self._put(msgs, metadata=self._metadata, timeout=self.timeout_s)
        return resp.stored

    @_translating
    async def lookup(self, tokens: Sequence[int], pin_ttl_s: int = 0) -> C.LookupResult:
        return await self.lookup_keys(self.keys(tokens), pin_ttl_s)

    @_translating
    async def lookup_keys(self, keys: Sequence[bytes], pin_ttl_s: int = 0) -> C.LookupResult:
        """Same-host clients read the daemon's presence index (no RPC) unless pinning."""
        if self.presence is not None and self.presence.stale():   # the daemon restarted
            self.presence.close()
            self.presence = None
            await self._attach_presence()
        if self.presence is not None and not pin_ttl_s:
            hit = C.lookup_from_presence(self.presence, self.namespace_id, keys, self.namespace.chunk_tokens)
            if hit is not None:
                return hit
        resp = await self._lookup(data_pb2.LookupRequest(namespace_id=self.namespace_id, keys=list(keys),
                                                         pin_ttl_s=pin_ttl_s),
                                  metadata=self._metadata, timeout=self.timeout_s)
        n = resp.matched_chunks
        return C.LookupResult(n * self.namespace.chunk_tokens, n, tuple(Tier(t) for t in resp.tiers))

    @_translating
    async def retrieve(self, tokens: Sequence[int], as_torch: bool = False, verify_crc: bool | None = None):
        keys = self.keys(tokens)
        asm = C.ChunkAssembler(self.namespace, len(keys), verify_crc)
        if keys:
            call = self._get(data_pb2.GetRequest(namespace_id=self.namespace_id, keys=keys, encoding=self._get_encoding),
                             metadata=self._metadata, timeout=self.timeout_s)
            async for msg in call:
                if not asm.feed(msg):
                    call.cancel()
                    break
        return asm.matched * self.namespace.chunk_tokens, asm.result(as_torch)

    @_translating
    async def delete(self, keys: Sequence[bytes]) -> int:
        resp = await self._delete(data_pb2.DeleteRequest(namespace_id=self.namespace_id, keys=list(keys)),
                                  metadata=self._metadata, timeout=self.timeout_s)
        return resp.deleted

    async def _attach_presence(self) -> None:
        """Maps the daemon's presence index when this process can (same host, a token allowed
        the local path); otherwise lookups stay RPCs. Bulk data uses the stream path."""
        try:
            a = await self._attach(local_pb2.AttachRequest(), metadata=self._metadata, timeout=self.timeout_s)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED,
                            grpc.StatusCode.PERMISSION_DENIED):  # no local_path right: stream path
                return
            raise from_rpc_error(e, self.addr) from None
        if a.index_path:
            self.presence = PresenceReader.open(a.index_path, a.nonce)

    async def close(self) -> None:
        if self.presence is not None:
            self.presence.close()
            self.presence = None
        await self._channel.close()

    async def __aenter__(self) -> "AsyncKVStoreClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
