"""Synchronous client.

    from kvstore_client import KVStoreClient, Namespace
    ns = Namespace(model="HuggingFaceTB/SmolLM2-135M-Instruct@<rev>", dtype="float16",
                   num_layers=30, num_kv_heads=3, head_dim=64)
    with KVStoreClient("127.0.0.1:50051", ns) as c:
        c.store(tokens, kv)                 # kv: [layers, 2, len(tokens), kv_heads, head_dim]
        hit = c.lookup(tokens)              # LookupResult(matched_tokens, matched_chunks, tiers)
        n, kv2 = c.retrieve(tokens)         # kv2 covers the first n tokens

Keys are computed locally from docs/keys.md; the daemon only supplies the namespace id
(which hashes in the tenant of the caller's token). Errors are ``kvstore_client.errors``.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import grpc

from . import _common as C
from kvstore_wire._proto.kvstore.v1 import data_pb2, local_pb2
from kvstore_wire.framing import data_or_message, serializer
from .errors import InvalidArgument, KVStoreClientError, from_rpc_error
from kvstore_wire.keys import Namespace, prefix_keys
from kvstore_native import transfer
from .local import SharedArena
from kvstore_wire.presence import PresenceReader
from kvstore_wire.types import Durability, Encoding, KeyKind, Tier

log = logging.getLogger(__name__)

#: Copy threads on the same-host path: enough to saturate memory bandwidth on a typical
#: server socket without taking cores from the engine.
DEFAULT_COPY_THREADS = 4

_SVC = "/kvstore.v1.KVStore/"
_LOCAL = "/kvstore.v1.LocalData/"


def channel_options() -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", C.CLIENT_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", C.CLIENT_MAX_MESSAGE_BYTES)]


def bind_stubs(client, ch) -> None:
    """Sets the RPC callables on ``client`` (``_register``, ``_put``, ``_lookup``, ``_exists``,
    ``_get``, ``_delete``, and the LocalData ones) for a sync or an aio channel alike."""
    D, L = data_pb2, local_pb2
    client._register = ch.unary_unary(_SVC + "RegisterNamespace", D.RegisterNamespaceRequest.SerializeToString,
                                      D.RegisterNamespaceResponse.FromString)
    client._put = ch.stream_unary(_SVC + "Put", serializer, D.PutResponse.FromString)
    client._lookup = ch.unary_unary(_SVC + "Lookup", D.LookupRequest.SerializeToString, D.LookupResponse.FromString)
    client._exists = ch.unary_unary(_SVC + "Exists", D.ExistsRequest.SerializeToString, D.ExistsResponse.FromString)
    client._get = ch.unary_stream(_SVC + "Get", D.GetRequest.SerializeToString,
                                  functools.partial(data_or_message, message_cls=D.GetResponse))
    client._delete = ch.unary_unary(_SVC + "Delete", D.DeleteRequest.SerializeToString, D.DeleteResponse.FromString)
    client._attach = ch.unary_unary(_LOCAL + "Attach", L.AttachRequest.SerializeToString, L.AttachResponse.FromString)
    client._lease_read = ch.unary_unary(_LOCAL + "LeaseRead", L.LeaseReadRequest.SerializeToString,
                                        L.LeaseReadResponse.FromString)
    client._reserve = ch.unary_unary(_LOCAL + "ReserveWrite", L.ReserveWriteRequest.SerializeToString,
                                     L.ReserveWriteResponse.FromString)
    client._commit = ch.unary_unary(_LOCAL + "CommitWrite", L.CommitWriteRequest.SerializeToString,
                                    L.CommitWriteResponse.FromString)
    client._release = ch.unary_unary(_LOCAL + "Release", L.ReleaseRequest.SerializeToString,
                                     L.ReleaseResponse.FromString)


def _translating(fn):
    @functools.wraps(fn)
    def wrapper(self, *a, **kw):
        try:
            return fn(self, *a, **kw)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.addr) from None
    return wrapper


class KVStoreClient:
    """One namespace on one daemon. Thread-safe (gRPC channels are)."""

    def __init__(self, addr: str, namespace: Namespace | Mapping[str, Any], token: str | None = None,
                 timeout_s: float | None = 60.0, local: bool | None = None, copy_threads: int | None = None) -> None:
        """``local``: use the same-host shared-memory path (True: required; None: when the
        daemon's arena can be mapped from here, else the stream path; False: never).
        ``copy_threads``: threads copying chunks on the same-host path (default: up to 4)."""
        self.copy_threads = copy_threads or min(DEFAULT_COPY_THREADS, os.cpu_count() or 1)
        self._copies: ThreadPoolExecutor | None = None
        self._release_q: queue.SimpleQueue = queue.SimpleQueue()
        self._release_lock = threading.Lock()
        self._releaser: threading.Thread | None = None
        self.addr = addr
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = grpc.insecure_channel(addr, options=channel_options())
        bind_stubs(self, self._channel)
        # Chunks come as stored when this process can decode bitstreams, else the daemon decodes.
        self._get_encoding = 0 if C.codec_available() else int(Encoding.RAW)
        self.arena: SharedArena | None = None
        self.presence: PresenceReader | None = None
        self._nonce = b""
        try:
            self._connect(C.as_namespace(namespace))
            if local is not False:
                self.arena = self._attach_arena()
                if local and self.arena is None:
                    raise KVStoreClientError(f"the daemon at {addr} has no shared arena this process can map "
                                             "(another host, or dram.shm_name is empty); pass local=None to "
                                             "fall back to the stream path")
        except BaseException:
            self._channel.close()
            raise

    def _attach_arena(self) -> SharedArena | None:
        try:
            a = self._attach(local_pb2.AttachRequest(), metadata=self._metadata, timeout=self.timeout_s)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                return None
            raise from_rpc_error(e, self.addr) from None
        arena = SharedArena.open(a.arena_path, a.arena_bytes, a.nonce, a.nonce_offset)
        self._nonce = a.nonce if arena is not None else b""
        if arena is not None and a.index_path:
            self.presence = PresenceReader.open(a.index_path, a.nonce)
        return arena

    def _reattach(self) -> None:
        """The daemon restarted (new arena): drop the old mappings and map the new ones; the
        stream path is used if that is no longer possible."""
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        if self.presence is not None:
            self.presence.close()
            self.presence = None
        self.arena = self._attach_arena()

    def _same_arena(self, nonce: bytes) -> bool:
        """Whether offsets from a response with this arena nonce are valid in our mapping;
        re-attaches when the daemon restarted since we mapped it."""
        if nonce == self._nonce:
            return True
        self._reattach()
        return self.arena is not None and nonce == self._nonce

    @property
    def transport(self) -> str:
        """``"shm"`` (same-host shared memory) or ``"grpc"`` (streamed)."""
        return "shm" if self.arena is not None else "grpc"

    @_translating
    def _connect(self, ns: Namespace) -> None:
        resp = self._register(data_pb2.RegisterNamespaceRequest(spec=C.spec_of(ns)), metadata=self._metadata,
                              timeout=self.timeout_s, wait_for_ready=False)
        reg = C.registration(ns, resp)
        self.namespace, self.namespace_id, self.piece_bytes = reg.namespace, reg.namespace_id, reg.piece_bytes

    # ------------------------------------------------------------------ keys
    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        """Prefix keys of the leading full chunks of ``tokens``."""
        return prefix_keys(self.namespace_id, tokens, self.namespace.chunk_tokens)

    # ------------------------------------------------------------------ data plane
    @_translating
    def exists(self, keys: Sequence[bytes]) -> list[Tier]:
        resp = self._exists(data_pb2.ExistsRequest(namespace_id=self.namespace_id, keys=list(keys)),
                            metadata=self._metadata, timeout=self.timeout_s)
        return [Tier(t) for t in resp.tiers]

    @_translating
    def store(self, tokens: Sequence[int], kv, durability: Durability = Durability.MEMORY) -> int:
        """Stores the leading full chunks of ``tokens`` from ``kv`` (namespace layout, covering
        at least those chunks' tokens), skipping chunks already stored. Returns the number of
        chunks newly stored."""
        ns = self.namespace
        local = self.arena is not None
        u8 = C.kv_bytes_array(kv, ns, keep_device=local)
        keys = self.keys(tokens)
        have = u8.shape[C.token_axis(ns)]
        n = min(len(keys), have // ns.chunk_tokens)
        if n == 0:
            return 0
        if local:  # ReserveWrite reports chunks already stored: no Exists round trip
            stored = self._store_local(u8, keys[:n], list(range(n)), Durability(durability))
            if stored is not None:
                return stored
            u8 = C.kv_bytes_array(kv, ns)   # the shared arena went away: stream it
        present = self.exists(keys[:n])
        todo = [i for i in range(n) if present[i] == Tier.NONE]
        if not todo:
            return 0
        payloads = C.chunk_payloads(u8, ns, n)
        msgs = C.put_messages(self.namespace_id, [keys[i] for i in todo], [payloads[i] for i in todo], ns,
                              Durability(durability), self.piece_bytes)
        resp = self._put(msgs, metadata=self._metadata, timeout=self.timeout_s)
        return resp.stored

    def _store_local(self, u8, keys: list[bytes], chunks: list[int], durability: Durability) -> int | None:
        """Same-host store: reserve arena extents, copy each chunk straight into its extent
        (the only copy), commit; the daemon's DRAM tier takes the extents over. None when
        the arena can no longer be mapped (the caller streams instead)."""
        ns = self.namespace
        size = ns.chunk_bytes()
        req = local_pb2.ReserveWriteRequest(namespace_id=self.namespace_id, chunks=[
            local_pb2.ChunkToWrite(key=k, key_kind=KeyKind.PREFIX, num_tokens=ns.chunk_tokens, encoding=Encoding.RAW,
                                   payload_bytes=size) for k in keys])
        resp = self._reserve(req, metadata=self._metadata, timeout=self.timeout_s)
        if resp.lease_id == 0:
            return 0
        if not self._same_arena(resp.arena_nonce):
            self._release_later(resp.lease_id)
            return None
        try:
            cuda = C.is_cuda_tensor(u8)
            kernel = cuda and self.arena.register_cuda() and transfer.cuda_available() and u8.is_contiguous()
            if kernel:
                import torch

                stream = torch.cuda.current_stream(u8.device)
                planes, heads, elt = C.planes_of(u8, ns)
            for slot in resp.slots:
                if slot.exists:
                    continue
                dst = self.arena.view(slot.offset, slot.length)
                if kernel:
                    # One kernel writes the chunk from the engine's tensor straight into the
                    # registered extent over PCIe.
                    start = chunks[slot.index] * ns.chunk_tokens
                    spec = transfer.PlaneSpec(planes, list(range(start, start + ns.chunk_tokens)), heads,
                                              ns.head_dim * elt, heads * ns.head_dim * elt, ns.head_dim * elt)
                    transfer.gather(spec, int(dst.ctypes.data), device=True, stream=stream.cuda_stream)
                else:
                    C.copy_chunk_out(u8, ns, chunks[slot.index], dst)
            if cuda:
                import torch

                torch.cuda.current_stream(u8.device).synchronize()   # bytes in the arena before commit
            # The daemon publishes an extent only when this CRC32C of what was written matches it.
            crcs = [C.crc32c(self.arena.view(sl.offset, sl.length)) for sl in resp.slots if not sl.exists]
        except BaseException:
            self._release(local_pb2.ReleaseRequest(lease_ids=[resp.lease_id]), metadata=self._metadata,
                          timeout=self.timeout_s)
            raise
        done = self._commit(local_pb2.CommitWriteRequest(lease_id=resp.lease_id, durability=int(durability),
                                                         crc32c=crcs),
                            metadata=self._metadata, timeout=self.timeout_s)
        return done.stored

    @_translating
    def lookup(self, tokens: Sequence[int], pin_ttl_s: int = 0) -> C.LookupResult:
        """The longest stored prefix of ``tokens``' full chunks. On the same host this reads
        the daemon's presence index (no RPC) unless ``pin_ttl_s`` asks for a pin."""
        if self.presence is not None and self.presence.stale():
            self._reattach()
        if self.presence is not None and not pin_ttl_s:
            hit = C.lookup_from_presence(self.presence, self.namespace_id, self.keys(tokens),
                                         self.namespace.chunk_tokens)
            if hit is not None:
                return hit
        resp = self._lookup(data_pb2.LookupRequest(namespace_id=self.namespace_id, keys=self.keys(tokens),
                                                   pin_ttl_s=pin_ttl_s), metadata=self._metadata, timeout=self.timeout_s)
        n = resp.matched_chunks
        return C.LookupResult(n * self.namespace.chunk_tokens, n, tuple(Tier(t) for t in resp.tiers))

    @_translating
    def retrieve(self, tokens: Sequence[int], as_torch: bool = False, verify_crc: bool | None = None):
        """``(matched_tokens, kv)`` for the longest stored prefix of ``tokens``' full chunks."""
        asm = self._fetch(self.keys(tokens), verify_crc, None)
        return asm.matched * self.namespace.chunk_tokens, asm.result(as_torch)

    @_translating
    def retrieve_into(self, tokens: Sequence[int], out, verify_crc: bool | None = None) -> int:
        """Writes the longest stored prefix of ``tokens``' full chunks into ``out`` (a
        contiguous numpy array or CPU tensor in the namespace layout holding exactly those
        full chunks' tokens) without allocating; returns the matched token count. Tokens
        past the match are left as they were."""
        keys = self.keys(tokens)
        if C.is_cuda_tensor(out):
            return self._retrieve_cuda(keys, out) * self.namespace.chunk_tokens
        return self._fetch(keys, verify_crc, out).matched * self.namespace.chunk_tokens

    def _retrieve_cuda(self, keys: list[bytes], out) -> int:
        """Into a CUDA tensor: from leased arena extents (registered with CUDA) by the scatter
        kernel, one host->device pass; without the shared path, through a host buffer."""
        import torch

        ns = self.namespace
        if out.dtype != C.torch_dtype(ns.dtype) or not out.is_contiguous() or \
                tuple(out.shape) != ns.chunk_shape(len(keys) * ns.chunk_tokens):
            raise InvalidArgument(f"out must be a contiguous {ns.dtype.name} tensor of shape "
                                  f"{list(ns.chunk_shape(len(keys) * ns.chunk_tokens))}")
        if self.arena is None or not self.arena.register_cuda():
            return self._retrieve_via_host(keys, out)
        resp = self._lease_read(local_pb2.LeaseReadRequest(namespace_id=self.namespace_id, keys=keys),
                                metadata=self._metadata, timeout=self.timeout_s)
        if not self._same_arena(resp.arena_nonce) or not self.arena.register_cuda():
            self._release_later(resp.lease_id)
            return self._retrieve_via_host(keys, out)
        stream = torch.cuda.current_stream(out.device)
        n = 0
        try:
            planes, heads, elt = C.planes_of(out, ns)
            for ext in resp.extents:
                if not ext.found or ext.index != n:
                    break
                start = n * ns.chunk_tokens
                src = self.arena.view(ext.offset, ext.length)
                if ext.encoding != Encoding.RAW:
                    raw = torch.from_numpy(C.decode_chunk(src)).view(out.dtype).view(ns.chunk_shape())
                    out[C._token_slice(out.dim(), ns, n)].copy_(raw)
                else:
                    spec = transfer.PlaneSpec(planes, list(range(start, start + ns.chunk_tokens)),
                                              heads, ns.head_dim * elt, heads * ns.head_dim * elt, ns.head_dim * elt)
                    transfer.scatter(int(src.ctypes.data), spec, device=True, stream=stream.cuda_stream)
                n += 1
            stream.synchronize()  # the extents are read before the lease ends
        finally:
            self._release_later(resp.lease_id)
        return n

    def _copy_pool(self) -> ThreadPoolExecutor | None:
        """Threads that copy chunks between the arena and caller buffers in parallel (numpy
        releases the GIL); None with one thread."""
        if self._copies is None and self.copy_threads > 1:
            self._copies = ThreadPoolExecutor(self.copy_threads, thread_name_prefix="kvstore-copy")
        return self._copies

    def _retrieve_via_host(self, keys: list[bytes], out) -> int:
        """Into a CUDA tensor through a pinned host buffer (no usable shared arena)."""
        import torch

        host = torch.empty(out.shape, dtype=out.dtype).pin_memory()
        n = self._fetch(keys, None, host).matched
        out.copy_(host)
        return n

    def _release_later(self, lease_id: int) -> None:
        """Ends a read lease without waiting for the answer: a background thread sends the
        Release (batched), off the caller's critical path. If it never arrives, the lease
        still expires after server.lease_ttl_s."""
        if not lease_id:
            return
        with self._release_lock:
            if self._releaser is None:
                self._releaser = threading.Thread(target=self._release_loop, name="kvstore-release", daemon=True)
                self._releaser.start()
        self._release_q.put(lease_id)

    def _release_loop(self) -> None:
        while True:
            ids = [self._release_q.get()]
            while not self._release_q.empty():
                ids.append(self._release_q.get_nowait())
            live = [i for i in ids if i is not None]
            if live:
                try:
                    self._release(local_pb2.ReleaseRequest(lease_ids=live), metadata=self._metadata,
                                  timeout=self.timeout_s)
                except grpc.RpcError as e:
                    log.info("releasing %d leases failed (%s); they expire on the daemon by themselves",
                             len(live), e.code())
            if None in ids:
                return

    def _fetch(self, keys: list[bytes], verify_crc: bool | None, out) -> "C.ChunkAssembler":
        if verify_crc is None and self.arena is not None:
            # Shared memory: the bytes cross no network, and the daemon checksummed them on
            # the way in; verifying again would read every byte a second time.
            verify_crc = False
        asm = C.ChunkAssembler(self.namespace, len(keys), verify_crc, out)
        if keys and self.arena is not None:
            self._retrieve_local(keys, asm)
        elif keys:
            call = self._get(data_pb2.GetRequest(namespace_id=self.namespace_id, keys=keys, encoding=self._get_encoding),
                             metadata=self._metadata, timeout=self.timeout_s)
            for msg in call:
                if not asm.feed(msg):
                    call.cancel()
                    break
        return asm

    def _retrieve_local(self, keys: list[bytes], asm: "C.ChunkAssembler") -> None:
        """Same-host retrieve: lease the chunks, copy each from the mapped arena into place,
        release. Chunks the daemon could not place in the arena come over the stream."""
        resp = self._lease_read(local_pb2.LeaseReadRequest(namespace_id=self.namespace_id, keys=keys),
                                metadata=self._metadata, timeout=self.timeout_s)
        usable = self._same_arena(resp.arena_nonce)
        try:
            items = []
            for ext in resp.extents if usable else ():
                if not ext.found or ext.index != asm.matched + len(items):
                    break
                items.append((self.arena.view(ext.offset, ext.length), ext.num_tokens, Encoding(ext.encoding),
                              ext.crc32c))
            asm.place_many(items, self._copy_pool())
        finally:
            self._release_later(resp.lease_id)
        if asm.matched < len(keys):
            # Absent, or present but not placeable in the arena (DRAM full of pinned chunks):
            # the stream path serves what exists.
            base = asm.matched
            call = self._get(data_pb2.GetRequest(namespace_id=self.namespace_id, keys=keys[base:], encoding=self._get_encoding),
                             metadata=self._metadata, timeout=self.timeout_s)
            for msg in call:
                if not asm.feed(msg, index_base=base):
                    call.cancel()
                    break

    @_translating
    def delete(self, keys: Sequence[bytes]) -> int:
        resp = self._delete(data_pb2.DeleteRequest(namespace_id=self.namespace_id, keys=list(keys)),
                            metadata=self._metadata, timeout=self.timeout_s)
        return resp.deleted

    def close(self) -> None:
        if self._releaser is not None:
            self._release_q.put(None)
            self._releaser.join(timeout=self.timeout_s or None)
        if self._copies is not None:
            self._copies.shutdown(wait=True)
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        if self.presence is not None:
            self.presence.close()
            self.presence = None
        self._channel.close()

    def __enter__(self) -> "KVStoreClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
