"""The client core: every operation written once, as a plan the sync and async fronts drive.

``ClientCore`` holds one session's state (namespace, ids, the mapped arena and presence
index) and turns each public call into a generator of ``_steps`` (RPCs and memory work).
``KVStoreClient`` runs the steps blocking, ``AsyncKVStoreClient`` awaits them, so both have
the same behaviour by construction: same-host path, presence lookups, restart detection,
CRC verification, RAW fallback when this process cannot decode bitstreams.

Threads: a plan runs on its caller's thread (the event loop's in the async client); its
``Work`` steps may run on a worker thread. The core's state changes only in plans
(``connect``, and ``_shm.reattach`` after a daemon restart). A sync client shared by threads
may re-attach twice after a restart: both map the same new arena and the last one wins; the
old mapping stays valid for views already handed out (``SharedArena.close``).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Generator, Mapping, Sequence

from kvstore_wire import crc as _crc
from kvstore_wire._proto.kvstore.v1 import data_pb2
from kvstore_wire.keys import Namespace, PrefixKeys, prefix_keys
from kvstore_wire.presence import PresenceReader
from kvstore_wire.types import Durability, Encoding, Tier

from . import _common as C
from . import _shm
from ._steps import Call, Step, Stream, Upload, Work
from .errors import KVStoreClientError
from .local import SharedArena

#: Copy threads on the same-host path: enough to saturate memory bandwidth on a typical
#: server socket without taking cores from the engine.
DEFAULT_COPY_THREADS = 4

Plan = Generator[Step, Any, Any]


def crc_backend() -> str:
    """Which CRC32C implementation verifies chunks in this process (``kvstore_wire.crc.BACKEND``)."""
    backend = getattr(_crc, "BACKEND", None)
    if backend is not None:
        return str(backend)
    return "native" if _crc.HAVE_FAST_CRC else "python"


class ClientCore:
    """One namespace on one daemon, independent of how RPCs are run."""

    def __init__(self, addr: str, *, local: bool | None, copy_threads: int | None,
                 release_later: Callable[[int], None]) -> None:
        """``release_later(lease_id)``: the front end ends a lease off the caller's path
        (called from plan code only, on the plan's thread)."""
        self.addr = addr
        self.local = local
        self.copy_threads = copy_threads or min(DEFAULT_COPY_THREADS, os.cpu_count() or 1)
        self.release_later = release_later
        # Chunks come as stored when this process can decode bitstreams, else the daemon decodes.
        self.get_encoding = 0 if C.codec_available() else int(Encoding.RAW)
        self.namespace: Namespace | None = None
        self.namespace_id = b""
        self.piece_bytes = C.DEFAULT_PIECE_BYTES
        self.arena: SharedArena | None = None
        self.presence: PresenceReader | None = None
        self.nonce = b""
        #: ``AttachResponse.hbm``: the daemon's HBM pool export, or None.
        self.hbm = None
        #: ``AttachResponse.lease_ttl_s`` and ``unbound_reservations`` (GPU write-ahead).
        self.lease_ttl_s = 30.0
        self.unbound_reservations = False
        #: ``_control.ControlChannel`` to the daemon's control socket (same-host hot calls
        #: without gRPC), or None: those calls go over gRPC.
        self.control = None
        #: The front end's ``gpu_route.GpuRoute`` (CUDA tensors go to the GPU data path), or None.
        self.gpu = None
        self._copies: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ session
    @property
    def transport(self) -> str:
        """``"shm"`` (same-host shared memory) or ``"grpc"`` (streamed)."""
        return "shm" if self.arena is not None else "grpc"

    def connect(self, namespace: Namespace | Mapping[str, Any]) -> Plan:
        ns = C.as_namespace(namespace)
        resp = yield Call("register", data_pb2.RegisterNamespaceRequest(spec=C.spec_of(ns)))
        reg = C.registration(ns, resp)
        self.namespace, self.namespace_id, self.piece_bytes = reg.namespace, reg.namespace_id, reg.piece_bytes
        if self.local is not False:
            yield from _shm.attach(self)
            if self.local and self.arena is None:
                raise KVStoreClientError(f"the daemon at {self.addr} has no shared arena this process can map "
                                         "(another host, or dram.shm_name is empty); pass local=None to "
                                         "fall back to the stream path")

    def copy_pool(self) -> ThreadPoolExecutor | None:
        """Threads that copy chunks between the arena and caller buffers in parallel (numpy
        releases the GIL); None with one thread."""
        if self._copies is None and self.copy_threads > 1:
            self._copies = ThreadPoolExecutor(self.copy_threads, thread_name_prefix="kvstore-copy")
        return self._copies

    def close(self) -> None:
        """Memory side of closing (the front end closes its channel and lease releaser)."""
        if self._copies is not None:
            self._copies.shutdown(wait=True)
            self._copies = None
        _shm.detach(self)

    # ------------------------------------------------------------------ keys
    def keys(self, tokens: Sequence[int], include_partial: bool = False) -> list[bytes]:
        """Prefix keys of the leading full chunks of ``tokens`` (and of the trailing partial
        chunk, when there is one and ``include_partial`` asks for it)."""
        return prefix_keys(self.namespace_id, tokens, self.namespace.chunk_tokens, include_partial=include_partial)

    def tail_tokens(self, tokens: Sequence[int]) -> int:
        """Tokens of ``tokens``' trailing partial chunk (0 when it ends on a chunk boundary)."""
        return len(tokens) % self.namespace.chunk_tokens

    def storable_tokens(self, tokens: Sequence[int], kv) -> int:
        """How many leading tokens a ``store(tokens, kv)`` covers: whole chunks only, bounded by
        both ``tokens`` and ``kv``'s token axis. A trailing partial chunk is not stored."""
        have = len(tokens) if kv is None else min(len(tokens), C.token_count(kv, self.namespace))
        return have // self.namespace.chunk_tokens * self.namespace.chunk_tokens

    # ------------------------------------------------------------------ data plane
    def exists(self, keys: Sequence[bytes]) -> Plan:
        resp = yield Call("exists", data_pb2.ExistsRequest(namespace_id=self.namespace_id, keys=list(keys)))
        return [Tier(t) for t in resp.tiers]

    def store(self, tokens: Sequence[int], kv, durability: Durability, include_partial: bool = False) -> Plan:
        ns = self.namespace
        durability = Durability(durability)
        local = self.arena is not None
        u8 = C.kv_bytes_array(kv, ns, keep_device=local)
        keys = self.keys(tokens)
        have = C.token_count(u8, ns)
        n = min(len(keys), have // ns.chunk_tokens)
        stored = None
        if n and local and self.gpu is not None and C.is_cuda_tensor(kv):
            stored = yield Work(self.gpu.store, (tokens, kv, durability, self.gpu.caller_stream(kv), keys[:n]))  # None: not served
        if stored is None:
            stored = (yield from self._store_chunks(kv, u8, keys[:n], durability, ns.chunk_tokens)) if n else 0
        tail = self.tail_tokens(tokens)
        if include_partial and tail and n == len(keys) and have >= len(tokens):
            # The trailing partial chunk: one chunk of its own key (docs/keys.md), stored once
            # every full chunk before it is.
            key = prefix_keys(self.namespace_id, tokens, ns.chunk_tokens, include_partial=True)[-1]
            part = C.token_range(kv, ns, n * ns.chunk_tokens, len(tokens))
            stored += yield from self._store_chunks(part, C.kv_bytes_array(part, ns, keep_device=local), [key],
                                                    durability, tail)
        return stored

    def _store_chunks(self, kv, u8, keys: list[bytes], durability: Durability, num_tokens: int) -> Plan:
        """Chunks ``0..len(keys)`` of ``u8`` (``num_tokens`` tokens each: a full chunk, or one
        trailing partial chunk) under ``keys``: through the shared arena where it is mapped,
        else (or for what the arena refused) over the Put stream. Returns the chunks newly stored."""
        ns = self.namespace
        n = len(keys)
        stored, unsure = 0, []
        if self.arena is not None:  # ReserveWrite reports chunks already stored: no Exists round trip
            stored, done, unsure = yield from _shm.store_local(self, u8, keys, list(range(n)), durability, num_tokens)
            if done:
                return stored
            u8 = C.kv_bytes_array(kv, ns)   # refused, or the shared arena went away: stream the rest
        present = yield from self.exists(keys)
        # A refused commit's chunks found now were published by it, before the refusal.
        stored += sum(1 for i in unsure if present[i] != Tier.NONE)
        todo = [i for i in range(n) if present[i] == Tier.NONE]
        if not todo:
            return stored
        payloads = yield Work(C.put_payloads, (u8, ns, todo))
        msgs = C.put_messages(self.namespace_id, [keys[i] for i in todo], payloads, ns, durability, self.piece_bytes,
                              num_tokens)
        resp = yield Upload("put", msgs)
        return stored + resp.stored

    def lookup(self, tokens: Sequence[int], pin_ttl_s: int = 0, include_partial: bool = False) -> Plan:
        """``lookup_keys`` of ``tokens``' prefix keys; with ``include_partial`` the trailing
        partial chunk counts too (its tokens are matched only when every chunk before it is)."""
        keys = self.keys(tokens, include_partial)
        hit = yield from self.lookup_keys(keys, pin_ttl_s)
        tail = self.tail_tokens(tokens) if include_partial else 0
        if tail and hit.matched_chunks == len(keys):
            hit = C.LookupResult(len(tokens), hit.matched_chunks, hit.tiers)
        return hit

    def lookup_keys(self, keys: Sequence[bytes], pin_ttl_s: int = 0) -> Plan:
        """The longest stored prefix of ``keys``. On the same host this reads the daemon's
        presence index (no RPC) unless ``pin_ttl_s`` asks for a pin."""
        if self.presence is not None and self.presence.stale():   # the daemon restarted
            yield from _shm.reattach(self)
        if self.presence is not None and not pin_ttl_s:
            hit = C.lookup_from_presence(self.presence, self.namespace_id, keys, self.namespace.chunk_tokens)
            if hit is not None:
                return hit
        resp = yield Call("lookup", data_pb2.LookupRequest(namespace_id=self.namespace_id, keys=list(keys),
                                                           pin_ttl_s=pin_ttl_s))
        n = resp.matched_chunks
        return C.LookupResult(n * self.namespace.chunk_tokens, n, tuple(Tier(t) for t in resp.tiers))

    def retrieve(self, tokens: Sequence[int], as_torch: bool, verify_crc: bool | None,
                 include_partial: bool = False) -> Plan:
        last = self.tail_tokens(tokens) if include_partial else 0
        asm = yield from self.fetch(self.keys(tokens, include_partial), verify_crc, None, last)
        return asm.matched_tokens, asm.result(as_torch)

    def retrieve_into(self, tokens: Sequence[int], out, verify_crc: bool | None) -> Plan:
        if C.is_cuda_tensor(out):
            # Hashed as read: the GPU path's HBM loads hash later chunks while earlier ones copy.
            keys = PrefixKeys(self.namespace_id, tokens, self.namespace.chunk_tokens)
            if self.arena is not None and self.gpu is not None:
                _shm.check_cuda_out(self, keys, out)
                placed = yield Work(self.gpu.retrieve_into, (tokens, out, self.gpu.caller_stream(out), keys))
                if placed is not None:   # tokens; None: the GPU path cannot serve it
                    return placed
            n = yield from _shm.retrieve_cuda(self, keys[:], out)
        else:
            n = (yield from self.fetch(self.keys(tokens), verify_crc, out)).matched
        return n * self.namespace.chunk_tokens

    def delete(self, keys: Sequence[bytes]) -> Plan:
        resp = yield Call("delete", data_pb2.DeleteRequest(namespace_id=self.namespace_id, keys=list(keys)))
        return resp.deleted

    # ------------------------------------------------------------------ retrieve paths
    def fetch(self, keys: list[bytes], verify_crc: bool | None, out, last_tokens: int = 0) -> Plan:
        """The longest present prefix of ``keys`` assembled into ``out`` (or a new array):
        from the shared arena where it is mapped, the rest (or all) over the Get stream.
        ``last_tokens``: the last key is a trailing partial chunk of that many tokens.

        ``verify_crc`` None: verify what crossed a socket, not what the shared arena holds
        (those bytes crossed no network, and the daemon checksummed them on the way in)."""
        shm = self.arena is not None
        asm = C.ChunkAssembler(self.namespace, len(keys), False if verify_crc is None and shm else verify_crc, out,
                               last_tokens)
        if keys and shm:
            yield from _shm.retrieve_local(self, keys, asm)
        if asm.matched < len(keys):
            # Absent, or present but not placeable in the arena (DRAM full of pinned chunks):
            # the stream path serves what exists (verified unless the caller said no).
            if shm and verify_crc is None:
                asm.verify = True
            yield from self.stream_get(keys, asm)
        return asm

    def stream_get(self, keys: list[bytes], asm: "C.ChunkAssembler") -> Plan:
        base = asm.matched
        req = data_pb2.GetRequest(namespace_id=self.namespace_id, keys=keys[base:], encoding=self.get_encoding)
        yield Stream("get", req, functools.partial(asm.feed, index_base=base))
