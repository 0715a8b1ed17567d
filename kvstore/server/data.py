"""The data-plane servicer (``kvstore.v1.KVStore``): validates requests, calls the TierManager.

Threading: methods run on the event loop. ``TierManager.lookup/locate`` never block and run
inline; ``get``/``put``/``delete`` may do disk I/O and run on the worker pool.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from kvstore_wire._proto.kvstore.v1 import data_pb2
from kvstore_wire.keys import KEY_BYTES

import kvstore_native as native
from ..errors import DataLoss, FailedPrecondition, InvalidArgument
from ..metrics import RequestStats
from ..namespaces import NamespaceInfo, NamespaceRegistry
from ..types import ChunkMeta, Durability, Encoding, KeyKind
from . import convert, wire
from .auth import current_principal


def chunk_ids(info: NamespaceInfo, keys, max_keys: int) -> list[bytes]:
    """``namespace_id || key`` for each key, after checking count and lengths."""
    if len(keys) > max_keys:
        raise InvalidArgument(f"{len(keys)} keys in one request; the limit is server.max_keys_per_request="
                              f"{max_keys}: split the request")
    nid = info.namespace_id
    out = [nid + k for k in keys]
    for i, c in enumerate(out):
        if len(c) != 2 * KEY_BYTES:
            raise InvalidArgument(f"keys[{i}] is {len(keys[i])} bytes; keys are {KEY_BYTES}-byte digests "
                                  "(docs/keys.md)")
    return out


class _Incoming:
    """One chunk being received: header fields and a preallocated buffer."""

    __slots__ = ("index", "cid", "meta", "durability", "buf", "view", "filled", "crc")

    def __init__(self, index: int, cid: bytes, meta: ChunkMeta, durability: Durability, crc: int) -> None:
        self.index = index
        self.cid = cid
        self.meta = meta
        self.durability = durability
        self.buf = bytearray(meta.payload_bytes)
        self.view = memoryview(self.buf)
        self.filled = 0
        self.crc = crc


class DataServicer:
    def __init__(self, manager, registry: NamespaceRegistry, config, pool: Executor, stats: RequestStats) -> None:
        self._m = manager
        self._ns = registry
        self._cfg = config.server
        self._pool = pool
        self._stats = stats

    def _namespace(self, namespace_id: bytes) -> NamespaceInfo:
        return self._ns.get(namespace_id, current_principal().tenant_scope)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ------------------------------------------------------------------ RegisterNamespace
    async def RegisterNamespace(self, request, context):
        ns = convert.namespace_from_spec(request.spec, current_principal().tenant)
        info = await self._run(self._ns.register, ns)  # blocking: appends to the registry log and fsyncs
        return data_pb2.RegisterNamespaceResponse(namespace=convert.namespace_info(info),
                                                  max_message_bytes=self._cfg.max_message_bytes)

    # ------------------------------------------------------------------ Put
    def _begin(self, h, index: int) -> _Incoming:
        where = f"chunk {index} (key {h.key.hex()[:16]})"
        info = self._namespace(h.namespace_id)
        if len(h.key) != KEY_BYTES:
            raise InvalidArgument(f"{where}: key is {len(h.key)} bytes; keys are {KEY_BYTES}-byte digests")
        ns = info.namespace
        if not 1 <= h.num_tokens <= ns.chunk_tokens:
            raise InvalidArgument(f"{where}: num_tokens={h.num_tokens}, must be 1..{ns.chunk_tokens} "
                                  "(the namespace's chunk_tokens)")
        encoding = Encoding(h.encoding or Encoding.RAW)
        if encoding == Encoding.RAW:
            want = ns.chunk_bytes(h.num_tokens)
            if h.payload_bytes != want:
                raise InvalidArgument(
                    f"{where}: payload_bytes={h.payload_bytes} but a RAW chunk of {h.num_tokens} tokens in this "
                    f"namespace is {want} bytes (shape {list(ns.chunk_shape(h.num_tokens))}, {ns.dtype.name}); "
                    "check the tensor's shape, dtype and layout against the namespace")
        elif not 1 <= h.payload_bytes <= self._cfg.max_chunk_bytes:
            raise InvalidArgument(f"{where}: payload_bytes={h.payload_bytes}, must be 1..server.max_chunk_bytes="
                                  f"{self._cfg.max_chunk_bytes}")
        try:
            kind = KeyKind(h.key_kind or KeyKind.PREFIX)
            durability = Durability(h.durability or Durability.MEMORY)
        except ValueError as e:
            raise InvalidArgument(f"{where}: {e}") from None
        meta = ChunkMeta(num_tokens=h.num_tokens, encoding=encoding, payload_bytes=h.payload_bytes,
                         crc32c=h.crc32c, key_kind=kind)
        return _Incoming(index, info.namespace_id + h.key, meta, durability, h.crc32c)

    def _store(self, c: _Incoming):
        """Worker thread: verify the checksum, then hand the complete chunk to the manager."""
        crc = native.crc32c(c.view)
        if c.crc and crc != c.crc:
            raise DataLoss(f"chunk {c.index}: CRC32C of the received payload is {crc:#010x}, the header says "
                           f"{c.crc:#010x}; the data was corrupted in transit or the sender computed the "
                           "checksum over different bytes. Nothing was stored; retry the put")
        meta = c.meta if c.crc else c.meta.with_payload(c.meta.encoding, c.meta.payload_bytes, crc)
        return self._m.put(c.cid, meta, c.view, c.durability)

    async def Put(self, request_iterator, context):
        cur: _Incoming | None = None
        index = 0
        pending = []
        received = 0
        async for req in request_iterator:
            if isinstance(req, memoryview):
                if cur is None and index:
                    raise InvalidArgument(f"data message after chunk {index - 1} was complete: more data than its "
                                          "header's payload_bytes, or a missing header; send exactly "
                                          "payload_bytes of data after each header")
                if cur is None:
                    raise InvalidArgument("data message before any header: each chunk is a PutChunkHeader "
                                          "followed by its data messages")
                n = req.nbytes
                if cur.filled + n > cur.meta.payload_bytes:
                    raise InvalidArgument(f"chunk {cur.index}: {cur.filled + n} data bytes sent but the header "
                                          f"declared payload_bytes={cur.meta.payload_bytes}; send exactly that many")
                cur.view[cur.filled:cur.filled + n] = req
                cur.filled += n
                received += n
            elif req.WhichOneof("item") == "header":
                if cur is not None:
                    raise InvalidArgument(f"chunk {cur.index}: a new header arrived after {cur.filled} of "
                                          f"{cur.meta.payload_bytes} payload bytes; send all data first")
                cur = self._begin(req.header, index)
                index += 1
            elif req.WhichOneof("item") == "data":  # only reached for unusual encodings of data
                raise InvalidArgument("malformed data message; send PutRequest(data=...) pieces")
            else:
                raise InvalidArgument("empty PutRequest: set header or data")
            if cur is not None and cur.filled == cur.meta.payload_bytes:
                pending.append(asyncio.ensure_future(self._run(self._store, cur)))
                cur = None
        if cur is not None:
            raise InvalidArgument(f"stream ended after {cur.filled} of {cur.meta.payload_bytes} payload bytes of "
                                  f"chunk {cur.index}: truncated put, that chunk was not stored")
        results = await asyncio.gather(*pending)
        self._stats.add_bytes(received=received)
        stored = sum(1 for r in results if r.name == "STORED")
        return data_pb2.PutResponse(stored=stored, existed=len(results) - stored)

    # ------------------------------------------------------------------ Lookup / Exists
    async def Lookup(self, request, context):
        info = self._namespace(request.namespace_id)
        cids = chunk_ids(info, request.keys, self._cfg.max_keys_per_request)
        media = self._m.lookup(cids, request.pin_ttl_s)
        return data_pb2.LookupResponse(matched_chunks=len(media), tiers=[int(m) for m in media])

    async def Exists(self, request, context):
        info = self._namespace(request.namespace_id)
        cids = chunk_ids(info, request.keys, self._cfg.max_keys_per_request)
        return data_pb2.ExistsResponse(tiers=[0 if m is None else int(m) for m in self._m.locate(cids)])

    # ------------------------------------------------------------------ Get
    async def Get(self, request, context):
        info = self._namespace(request.namespace_id)
        cids = chunk_ids(info, request.keys, self._cfg.max_keys_per_request)
        if request.encoding not in (0, Encoding.RAW, Encoding.CODEC):
            raise InvalidArgument(f"encoding={request.encoding} is not an Encoding; use UNSPECIFIED (as stored), "
                                  "RAW or CODEC")
        piece = self._cfg.stream_piece_bytes
        sent = 0
        try:
            for i, cid in enumerate(cids):
                ref = await self._run(self._m.get, cid)
                if ref is None:
                    yield data_pb2.GetResponse(header=data_pb2.GetChunkHeader(index=i, found=False))
                    continue
                with ref:  # the lease is held until the last piece is handed to gRPC
                    m, view = ref.meta, ref.view
                    want = Encoding(request.encoding) if request.encoding else m.encoding
                    if want != m.encoding:
                        m, view = await self._run(self._transcode, ref, want)
                        view = memoryview(view).cast("B")
                    yield data_pb2.GetResponse(header=data_pb2.GetChunkHeader(
                        index=i, found=True, num_tokens=m.num_tokens, encoding=int(m.encoding),
                        payload_bytes=m.payload_bytes, crc32c=m.crc32c, tier=int(ref.medium),
                        key_kind=int(m.key_kind)))
                    for off in range(0, view.nbytes, piece):
                        yield wire.encode_data_piece(view[off:off + piece])
                    sent += view.nbytes
        finally:
            self._stats.add_bytes(sent=sent)

    def _transcode(self, ref, want: Encoding):
        """Worker thread: the leased chunk in the encoding the client asked for."""
        t = self._m.transcoder
        if t is None:
            raise FailedPrecondition(f"this daemon cannot convert chunks to {want.name}; request encoding "
                                     "UNSPECIFIED (as stored)")
        if want == Encoding.RAW:
            return t.decode(ref.meta, ref.view)
        return t.encode(ref.cid, ref.meta, ref.view, self._cfg.network_codec)

    # ------------------------------------------------------------------ Delete
    async def Delete(self, request, context):
        info = self._namespace(request.namespace_id)
        cids = chunk_ids(info, request.keys, self._cfg.max_keys_per_request)
        n = await self._run(lambda: sum(1 for c in cids if self._m.delete(c)))
        return data_pb2.DeleteResponse(deleted=n)
