"""The data-plane servicer (``kvstore.v1.KVStore``): protobuf <-> domain, nothing else.

Headers are checked by ``domain.chunks.validate_header`` (the same rules as ReserveWrite);
storage, checksums and codec conversion are the ``Store``'s.

Admission (``admission.py``): Put and Get streams pass a daemon-wide ``StreamGate``
(``server.max_concurrent_streams``); Put data counts against the ``InflightBudget`` (the
tenant's ``quotas.max_inflight_request_bytes`` and the daemon's
``quotas.daemon_max_inflight_request_bytes``) from the moment it arrives until its chunk is
stored, and nothing is allocated from a header's announced length. The idle deadline of
every stream (a Put that sends nothing, a Get whose reader takes nothing, for
``quotas.max_stream_idle_s``) is the interceptor's (``status.py``), not repeated here.

Threading: methods run on the event loop. ``Store.lookup/locate`` never block and run
inline; ``get``/``put``/``delete``/``read_as`` may do disk I/O or codec work and run on the
worker pool.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from kvstore_wire._proto.kvstore.v1 import data_pb2

from ..domain.chunks import ChunkHeader, chunk_ids, parse_durability, validate_header
from ..domain.errors import InvalidArgument
from ..domain.namespaces import NamespaceInfo
from ..domain.results import PutResult
from ..domain.types import ChunkId, ChunkMeta, Durability, Encoding
from ..metrics import RequestStats
from ..store import Store
from . import convert, wire
from .admission import InflightBudget, StreamGate
from .auth import current_principal


class _Incoming:
    """One chunk being received: its id, metadata and the data pieces that arrived so far.
    Nothing is allocated from the header's ``payload_bytes``: the pieces are the messages
    gRPC already holds, joined into one buffer (the one copy) when the chunk is complete."""

    __slots__ = ("index", "cid", "meta", "durability", "pieces", "filled", "tenant")

    def __init__(self, index: int, cid: ChunkId, meta: ChunkMeta, durability: Durability, tenant: str) -> None:
        self.index = index
        self.tenant = tenant    # whose in-flight bytes ``filled`` are
        self.cid = cid
        self.meta = meta
        self.durability = durability
        self.pieces: list[memoryview] = []
        self.filled = 0

    def payload(self) -> memoryview | bytes:
        """The complete payload (joins the pieces; one piece is used as is) and drops the pieces."""
        pieces, self.pieces = self.pieces, []
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _retrieve(f: asyncio.Future) -> None:
    """Done callback: consumes a background store's outcome (the stream already failed)."""
    if not f.cancelled():
        f.exception()


class DataServicer:
    def __init__(self, store: Store, config, pool: Executor, stats: RequestStats) -> None:
        self._store = store
        self._cfg = config.server
        self._pool = pool
        self._stats = stats
        self._budget = InflightBudget(config.quotas.daemon_max_inflight_request_bytes, self._cfg.inflight_wait_s,
                                      store.limits)
        self._streams = StreamGate(self._cfg.max_concurrent_streams)

    def _namespace(self, namespace_id: bytes) -> NamespaceInfo:
        return self._store.namespace(namespace_id, current_principal().tenant_scope)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ------------------------------------------------------------------ RegisterNamespace
    async def RegisterNamespace(self, request, context):
        ns = convert.namespace_from_spec(request.spec, current_principal().tenant)
        info = await self._run(self._store.namespaces.register, ns)  # blocking: registry log append + fsync
        return data_pb2.RegisterNamespaceResponse(namespace=convert.namespace_info(info),
                                                  max_message_bytes=self._cfg.max_message_bytes)

    # ------------------------------------------------------------------ Put
    def _begin(self, h, index: int) -> _Incoming:
        where = f"chunk {index} (key {h.key.hex()[:16]})"
        info = self._namespace(h.namespace_id)
        cid, meta = validate_header(info, ChunkHeader(h.key, h.num_tokens, h.payload_bytes, h.encoding,
                                                      h.key_kind, h.crc32c), self._cfg.max_chunk_bytes, where)
        return _Incoming(index, cid, meta, parse_durability(h.durability, where), current_principal().tenant)

    def _stored(self, c: _Incoming) -> PutResult:
        """Worker thread: the complete chunk to the store (which checks its CRC32C)."""
        return self._store.put(c.cid, c.meta, c.payload(), c.durability, where=f"chunk {c.index}")

    async def _store_and_release(self, c: _Incoming) -> PutResult:
        try:
            return await self._run(self._stored, c)
        finally:
            c.pieces = []
            self._budget.release(c.filled, c.tenant)

    async def Put(self, request_iterator, context):
        with self._streams.enter():
            pending: list[asyncio.Future] = []
            try:
                await self._receive(request_iterator, pending)
                results = await asyncio.gather(*pending)
            finally:
                for f in pending:   # after a failure, stores already started finish (and release) by themselves
                    f.add_done_callback(_retrieve)
        stored = sum(1 for r in results if r is PutResult.STORED)
        return data_pb2.PutResponse(stored=stored, existed=len(results) - stored)

    async def _receive(self, request_iterator, pending: list) -> None:
        """Reads the whole stream, starting a store per complete chunk (appended to ``pending``).
        Bytes count against the in-flight budget as they arrive, until their chunk is stored."""
        cur: _Incoming | None = None
        index = 0
        received = 0
        try:
            async for req in request_iterator:   # the interceptor ends a stream that sends nothing
                if isinstance(req, memoryview):
                    if cur is None and index:
                        raise InvalidArgument(f"data message after chunk {index - 1} was complete: more data than "
                                              "its header's payload_bytes, or a missing header; send exactly "
                                              "payload_bytes of data after each header")
                    if cur is None:
                        raise InvalidArgument("data message before any header: each chunk is a PutChunkHeader "
                                              "followed by its data messages")
                    n = req.nbytes
                    if cur.filled + n > cur.meta.payload_bytes:
                        raise InvalidArgument(f"chunk {cur.index}: {cur.filled + n} data bytes sent but the header "
                                              f"declared payload_bytes={cur.meta.payload_bytes}; send exactly that "
                                              "many")
                    await self._budget.acquire(n, cur.tenant)
                    cur.pieces.append(req)
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
                    pending.append(asyncio.ensure_future(self._store_and_release(cur)))
                    cur = None
        except BaseException:
            if cur is not None:         # a failed stream: drop the partial chunk's bytes
                cur.pieces = []
                self._budget.release(cur.filled, cur.tenant)
            raise
        finally:
            self._stats.add_bytes(received=received)
        if cur is not None:
            cur.pieces = []
            self._budget.release(cur.filled, cur.tenant)
            raise InvalidArgument(f"stream ended after {cur.filled} of {cur.meta.payload_bytes} payload bytes of "
                                  f"chunk {cur.index}: truncated put, that chunk was not stored")

    # ------------------------------------------------------------------ Lookup / Exists
    async def Lookup(self, request, context):
        info = self._namespace(request.namespace_id)
        cids = chunk_ids(info, request.keys, self._cfg.max_keys_per_request)
        tenant, pin = current_principal().tenant, request.pin_ttl_s
        if self._store.serves_prefixes:
            # A local miss: the rest of the prefix from the remote tier, on a worker (one
            # round trip, bounded by its deadline), promoted locally; then pinned and answered.
            if self._store.lookup(cids).matched < len(cids):
                await self._run(self._store.fill_prefix, cids)
        found = self._store.lookup(cids, pin, tenant, info.chunk_bytes)
        return data_pb2.LookupResponse(matched_chunks=found.matched, tiers=[int(m) for m in found.media])

    async def Exists(self, request, context):
        info = self._namespace(request.namespace_id)
        cids = chunk_ids(info, request.keys, self._cfg.max_keys_per_request)
        return data_pb2.ExistsResponse(tiers=[0 if m is None else int(m) for m in self._store.locate(cids)])

    # ------------------------------------------------------------------ Get
    async def Get(self, request, context):
        info = self._namespace(request.namespace_id)
        cids = chunk_ids(info, request.keys, self._cfg.max_keys_per_request)
        if request.encoding not in (0, Encoding.RAW, Encoding.CODEC):
            raise InvalidArgument(f"encoding={request.encoding} is not an Encoding; use UNSPECIFIED (as stored), "
                                  "RAW or CODEC")
        piece = self._cfg.stream_piece_bytes
        sent = 0
        if self._store.serves_prefixes:
            await self._run(self._store.fill_prefix, cids)  # a prefix missed locally: one remote batch
        # A reader that stops taking pieces would hold its lease (arena pages) forever: the
        # interceptor gives each send quotas.max_stream_idle_s, then closes this generator
        # (its ``with ref`` releases the lease).
        with self._streams.enter():
            try:
                for i, cid in enumerate(cids):
                    ref = await self._run(self._store.get, cid)
                    if ref is None:
                        yield data_pb2.GetResponse(header=data_pb2.GetChunkHeader(index=i, found=False))
                        continue
                    with ref:  # the lease is held until the last piece is handed to gRPC
                        m, view = ref.meta, ref.view
                        want = Encoding(request.encoding) if request.encoding else m.encoding
                        if want != m.encoding:
                            m, view = await self._run(self._store.read_as, ref, want)
                        yield data_pb2.GetResponse(header=data_pb2.GetChunkHeader(
                            index=i, found=True, num_tokens=m.num_tokens, encoding=int(m.encoding),
                            payload_bytes=m.payload_bytes, crc32c=m.crc32c, tier=int(ref.medium),
                            key_kind=int(m.key_kind)))
                        for off in range(0, view.nbytes, piece):
                            yield wire.encode_data_piece(view[off:off + piece])
                        sent += view.nbytes
            finally:
                self._stats.add_bytes(sent=sent)

    # ------------------------------------------------------------------ Delete
    async def Delete(self, request, context):
        info = self._namespace(request.namespace_id)
        cids = chunk_ids(info, request.keys, self._cfg.max_keys_per_request)
        n = await self._run(self._store.delete, cids)
        return data_pb2.DeleteResponse(deleted=n)
