"""Synchronous client: drives the ``_core`` plans with blocking RPCs.

    from kvstore_client import KVStoreClient, Namespace
    ns = Namespace(model="HuggingFaceTB/SmolLM2-135M-Instruct@<rev>", dtype="float16",
                   num_layers=30, num_kv_heads=3, head_dim=64)
    with KVStoreClient("127.0.0.1:50051", ns) as c:
        c.store(tokens, kv)                 # kv: [layers, 2, len(tokens), kv_heads, head_dim]
        hit = c.lookup(tokens)              # LookupResult(matched_tokens, matched_chunks, tiers)
        n, kv2 = c.retrieve(tokens)         # kv2 covers the first n tokens

Keys are computed locally from docs/keys.md; the daemon only supplies the namespace id
(which hashes in the tenant of the caller's token). Errors are ``kvstore_client.errors``.
``AsyncKVStoreClient`` (``aio.py``) has the same methods, awaited.
"""

from __future__ import annotations

import logging
import queue
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import grpc

from kvstore_wire._proto.kvstore.v1 import local_pb2
from kvstore_wire.keys import Namespace
from kvstore_wire.types import Durability, Tier

from . import _core, _views
from ._common import LookupResult
from ._control import with_control
from ._steps import Call, Stream, Upload, Work, bind_stubs, open_client_channel
from kvstore_wire.channel import TlsOptions
from .errors import from_rpc_error
from .gpu_route import GpuRoute

log = logging.getLogger(__name__)

DEFAULT_COPY_THREADS = _core.DEFAULT_COPY_THREADS


class KVStoreClient:
    """One namespace on one daemon. Thread-safe (gRPC channels are; see ``_core`` on re-attach)."""

    def __init__(self, addr: str, namespace: Namespace | Mapping[str, Any], token: str | None = None,
                 timeout_s: float | None = 60.0, local: bool | None = None, copy_threads: int | None = None,
                 tls: TlsOptions | None = None) -> None:
        """``local``: use the same-host shared-memory path (True: required; None: when the
        daemon's arena can be mapped from here, else the stream path; False: never).
        ``copy_threads``: threads copying chunks on the same-host path (default: up to 4).
        ``tls``: TLS (a client certificate for mutual TLS) for a TCP address; a ``token`` is sent
        only over TLS, a unix socket or loopback (InvalidArgument otherwise)."""
        self.addr = addr
        self.timeout_s = timeout_s
        self._metadata, self._channel = open_client_channel(addr, token, tls)
        self._release_q: queue.SimpleQueue = queue.SimpleQueue()
        self._release_lock = threading.Lock()   # guards _releaser (started once)
        self._releaser: threading.Thread | None = None
        self._core = _core.ClientCore(addr, local=local, copy_threads=copy_threads, release_later=self._release_later)
        self._core.gpu = GpuRoute(self)   # CUDA tensors: the GPU data path (kvstore_client.gpu)
        self._rpc = with_control(self._core, bind_stubs(self._channel))   # same-host hot calls: control socket
        try:
            self._run(self._core.connect(namespace))
        except BaseException:
            self._core.close()
            self._channel.close()
            raise

    # ------------------------------------------------------------------ driver
    def _run(self, plan):
        """Runs a plan to its end: each step blocking on this thread; a step's exception is
        thrown into the plan; an RPC error leaving the plan becomes a ``KVStoreClientError``."""
        try:
            result, error = None, None
            while True:
                try:
                    step = plan.throw(error) if error is not None else plan.send(result)
                except StopIteration as stop:
                    return stop.value
                result, error = None, None
                try:
                    result = self._do(step)
                except BaseException as e:  # noqa: BLE001 - handed to the plan, which re-raises
                    error = e
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.addr) from None
        finally:
            plan.close()

    def _do(self, step):
        if isinstance(step, Work):
            return step.fn(*step.args)
        if isinstance(step, Call):
            return self._rpc[step.rpc](step.request, metadata=self._metadata, timeout=self.timeout_s)
        if isinstance(step, Stream):
            call = self._rpc[step.rpc](step.request, metadata=self._metadata, timeout=self.timeout_s)
            try:
                for msg in call:
                    if not step.feed(msg):
                        break
            finally:
                call.cancel()   # no-op once the stream has ended
            return None
        if isinstance(step, Upload):
            return self._rpc[step.rpc](iter(step.messages), metadata=self._metadata, timeout=self.timeout_s)
        raise TypeError(f"unknown plan step {step!r}")

    # ------------------------------------------------------------------ session
    @property
    def namespace(self) -> Namespace:
        """The namespace as registered (with the tenant the daemon took from the credential)."""
        return self._core.namespace

    @property
    def namespace_id(self) -> bytes:
        return self._core.namespace_id

    @namespace_id.setter
    def namespace_id(self, namespace_id: bytes) -> None:
        """Tests set a foreign id to check the daemon's tenant isolation."""
        self._core.namespace_id = bytes(namespace_id)

    @property
    def piece_bytes(self) -> int:
        return self._core.piece_bytes

    @property
    def arena(self):
        """The mapped daemon arena (``local.SharedArena``), or None on the stream path."""
        return self._core.arena

    @arena.setter
    def arena(self, arena) -> None:
        """Tests set None to force the stream path on a client that mapped the arena."""
        self._core.arena = arena

    @property
    def _get_encoding(self) -> int:
        """The encoding Get asks for: 0 = as stored (this process decodes), RAW = daemon decodes."""
        return self._core.get_encoding

    @_get_encoding.setter
    def _get_encoding(self, encoding: int) -> None:
        self._core.get_encoding = int(encoding)

    @property
    def presence(self):
        """The mapped presence index (``kvstore_wire.presence.PresenceReader``), or None."""
        return self._core.presence

    @property
    def transport(self) -> str:
        """``"shm"`` (same-host shared memory) or ``"grpc"`` (streamed)."""
        return self._core.transport

    @property
    def crc_backend(self) -> str:
        """The CRC32C implementation verifying chunks here (``kvstore_wire.crc.BACKEND``)."""
        return _core.crc_backend()

    @property
    def _reserve(self):
        """The raw ReserveWrite stub (tests drive half-finished writes with it)."""
        return self._rpc["reserve"]

    # ------------------------------------------------------------------ keys
    def keys(self, tokens: Sequence[int], include_partial: bool = False) -> list[bytes]:
        """Prefix keys of the leading full chunks of ``tokens``; with ``include_partial``
        also the key of the trailing partial chunk, when ``tokens`` does not end on a chunk
        boundary (docs/keys.md: its key hashes its own token count, so it never matches a full chunk)."""
        return self._core.keys(tokens, include_partial)

    def tail_tokens(self, tokens: Sequence[int]) -> int:
        """Tokens of ``tokens``' trailing partial chunk (0 when it ends on a chunk boundary)."""
        return self._core.tail_tokens(tokens)

    def storable_tokens(self, tokens: Sequence[int], kv=None) -> int:
        """Leading tokens ``store(tokens, kv)`` covers: whole chunks only (a trailing partial
        chunk is never stored, since no prefix lookup could match its key)."""
        return self._core.storable_tokens(tokens, kv)

    # ------------------------------------------------------------------ data plane
    def exists(self, keys: Sequence[bytes]) -> list[Tier]:
        """The fastest tier holding each key (``Tier.NONE`` where absent)."""
        return self._run(self._core.exists(keys))

    def store(self, tokens: Sequence[int], kv, durability: Durability = Durability.MEMORY,
              include_partial: bool = False) -> int:
        """Stores the leading full chunks of ``tokens`` from ``kv`` (namespace layout, covering
        at least those chunks' tokens), skipping chunks already stored. Returns the number of
        chunks newly stored. Tokens past the last full chunk are not stored (see
        ``storable_tokens``; docs/client.md) unless ``include_partial``: then they are one more
        chunk of their own key (``keys(tokens, include_partial=True)``), stored after the full
        ones, which only a lookup of the very same tokens matches."""
        return self._run(self._core.store(tokens, kv, durability, include_partial))

    def lookup(self, tokens: Sequence[int], pin_ttl_s: int = 0, include_partial: bool = False) -> LookupResult:
        """The longest stored prefix of ``tokens``' full chunks (``include_partial``: and of
        the trailing partial chunk, matched only with every chunk before it; ``matched_tokens``
        then counts its tokens). On the same host this reads the daemon's presence index (no
        RPC) unless ``pin_ttl_s`` asks for a pin."""
        return self._run(self._core.lookup(tokens, pin_ttl_s, include_partial))

    def lookup_keys(self, keys: Sequence[bytes], pin_ttl_s: int = 0) -> LookupResult:
        """``lookup`` for precomputed prefix keys."""
        return self._run(self._core.lookup_keys(keys, pin_ttl_s))

    def retrieve(self, tokens: Sequence[int], as_torch: bool = False, verify_crc: bool | None = None,
                 include_partial: bool = False):
        """``(matched_tokens, kv)`` for the longest stored prefix of ``tokens``' full chunks
        (``include_partial``: and the trailing partial chunk, as ``lookup`` matches it).
        ``verify_crc`` None: chunks that crossed a socket are verified, arena reads are not."""
        return self._run(self._core.retrieve(tokens, as_torch, verify_crc, include_partial))

    def retrieve_into(self, tokens: Sequence[int], out, verify_crc: bool | None = None) -> int:
        """Writes the longest stored prefix of ``tokens``' full chunks into ``out`` (a
        contiguous numpy array, CPU or CUDA tensor in the namespace layout holding exactly
        those full chunks' tokens) without allocating; returns the matched token count.
        Tokens past the match are left as they were."""
        return self._run(self._core.retrieve_into(tokens, out, verify_crc))

    def delete(self, keys: Sequence[bytes]) -> int:
        """Deletes ``keys`` from every tier; returns how many existed."""
        return self._run(self._core.delete(keys))

    @contextmanager
    def leased_views(self, keys: Sequence[bytes], verify_crc: bool | None = None,
                     last_tokens: int = 0) -> Iterator[_views.LeasedViews]:
        """The longest stored prefix of ``keys`` as read-only chunk views (same host: the
        leased arena extents themselves, no copy), released when the block exits; see
        ``_views`` for the contract. The views must not be read after the block.
        ``last_tokens``: the last key is a trailing partial chunk of this many tokens
        (``keys(tokens, include_partial=True)``, ``tail_tokens(tokens)``); 0: all are full."""
        lv = self._run(_views.lease_views(self._core, list(keys), verify_crc, last_tokens))
        try:
            yield lv
        finally:
            lv.chunks = []
            self._release_later(lv.lease_id)

    # ------------------------------------------------------------------ leases
    def _release_later(self, lease_id: int) -> None:
        """Ends a lease without waiting for the answer: a background thread sends the
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
                    self._rpc["release"](local_pb2.ReleaseRequest(lease_ids=live), metadata=self._metadata,
                                         timeout=self.timeout_s)
                except grpc.RpcError as e:
                    log.info("releasing %d leases failed (%s); they expire on the daemon by themselves",
                             len(live), e.code())
            if None in ids:
                return

    def close(self) -> None:
        """Sends pending lease releases, unmaps the arena and closes the channel."""
        if self._releaser is not None:
            self._release_q.put(None)
            self._releaser.join(timeout=self.timeout_s or None)
        self._core.gpu.close()
        self._core.close()
        self._channel.close()

    def __enter__(self) -> "KVStoreClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
