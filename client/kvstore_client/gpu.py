"""The client's GPU data path over the same-host arena: batched, pipelined store and retrieve
between engine CUDA memory and the daemon's DRAM arena, GPU-side CRC32C, GPU decode of
compressed chunks, and loads from the daemon's HBM tier through CUDA IPC.

Entry points the client core calls (they use the client's bound RPC stubs, arena mapping and
lease releaser; nothing here opens a channel):

- :func:`store_cuda(client, tokens, src)` -> chunks newly stored
- :func:`retrieve_into_cuda(client, tokens, dst)` -> tokens placed

``src`` / ``dst`` is either a CUDA tensor in the namespace layout ``[layers, 2, tokens, heads,
dim]`` (contiguous: moved by the copy engine with ``cudaMemcpy2DAsync``, no SM time) or a
:class:`Paged` source (a list of per-chunk ``PlaneSpec``; vLLM layouts via
``kvstore_native.transfer.paged_spec``): moved through a device staging ring, one gather or
scatter kernel per chunk on the device (HBM speed) and one copy-engine copy per chunk over
PCIe.

Pipelining: chunks go in groups; the ReserveWrite / LeaseRead of group g+1 is in flight while
group g's copies run, and group g's CommitWrite (carrying the GPU CRC32Cs, so the daemon need
not read the bytes) is sent from a helper thread once its copies completed. Registrations
(``cudaHostRegister`` of the arena) are made once per mapping and reused.

Lock order: none here; the state object's staging ring is used by one call at a time (a lock
serialises calls of one client).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from kvstore_native import cuda_ipc, transfer
from kvstore_native.transfer import PlaneSpec
from kvstore_wire._proto.kvstore.v1 import local_pb2
from kvstore_wire.types import Durability, Encoding, KeyKind

from .errors import InvalidArgument, KVStoreClientError

__all__ = ["Paged", "GpuPath", "store_cuda", "retrieve_into_cuda", "HbmPoolMapping", "DEFAULT_GROUP_CHUNKS", "DEFAULT_STAGING_CHUNKS"]

#: Chunks in the first ReserveWrite / LeaseRead of a call: a small first request is answered
#: soonest, so copies start early; the rest of the call goes in ONE more request, in flight
#: meanwhile (each RPC costs the daemon a fixed ~1 ms, serialised: fewer, larger ones win).
DEFAULT_GROUP_CHUNKS = 2
#: Device staging buffers for paged sources (gather of chunk i+1 overlaps the PCIe copy of i).
DEFAULT_STAGING_CHUNKS = 3


@dataclass
class Paged:
    """An engine's paged KV: ``specs[i]`` says where chunk i's tokens live (``PlaneSpec``)."""

    specs: Sequence[PlaneSpec]


def _torch():
    import torch

    return torch


class GpuPath:
    """Per-client, per-device state: streams, events, staging ring, pinned CRC buffer."""

    def __init__(self, client, device: int | None = None, staging_chunks: int = DEFAULT_STAGING_CHUNKS,
                 group_chunks: int = DEFAULT_GROUP_CHUNKS) -> None:
        torch = _torch()
        self.client = client
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        self.copy_stream = torch.cuda.Stream(self.device)
        self.kernel_stream = torch.cuda.Stream(self.device)
        self.staging_chunks = max(1, staging_chunks)
        self.group_chunks = max(1, group_chunks)
        self._staging: list[Any] = []
        self._staging_free: list[Any] = []  # event per slot: recorded when its last reader finished
        self._lock = threading.Lock()
        self._commits = ThreadPoolExecutor(1, thread_name_prefix="kvstore-gpu-commit")
        self._pinned: dict[str, Any] = {}
        # Checksum buffer sets rotate over calls: a set is reused only once the commits of the
        # call that used it last are done (stores with wait=False overlap their commits with
        # later calls).
        self._sets = 4
        self._next_set = 0
        self._set_busy: list[Future | None] = [None] * self._sets

    def pinned_u32(self, name: str, n: int):
        """A cached pinned int32 host buffer of at least ``n`` entries (pinned allocations are
        slow: made once, reused by every call)."""
        torch = _torch()
        buf = self._pinned.get(name)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1024), dtype=torch.int32, pin_memory=True)
            self._pinned[name] = buf
        return buf

    def close(self) -> None:
        self._commits.shutdown(wait=True)

    # ---- helpers
    def _ensure_staging(self, nbytes: int) -> None:
        torch = _torch()
        if self._staging and self._staging[0].numel() >= nbytes:
            return
        self._staging = [torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                         for _ in range(self.staging_chunks)]
        self._staging_free = [None] * self.staging_chunks

    def _arena_ptr(self) -> int:
        arena = self.client.arena
        if arena is None or not arena.register_cuda():
            raise KVStoreClientError("the GPU data path needs the same-host arena registered with CUDA")
        return int(arena.view(0, 0).ctypes.data) if arena.size else 0

    def _rpc_meta(self) -> dict:
        return dict(metadata=self.client._metadata, timeout=self.client.timeout_s)


def _path(client) -> GpuPath:
    gp = getattr(client, "_gpu_path", None)
    if gp is None:
        gp = GpuPath(client)
        client._gpu_path = gp
    return gp


def _groups(n: int, first: int) -> list[tuple[int, int]]:
    """``[0, first)`` then ``[first, n)``: the request split of one call."""
    first = max(1, min(first, n))
    return [(0, first)] + ([(first, n)] if first < n else [])


def _rpc_errors(fn):
    """Maps gRPC failures to the client's exception classes (as the client's own methods do)."""
    import functools

    import grpc

    from .errors import from_rpc_error

    @functools.wraps(fn)
    def wrapper(client, *a, **kw):
        try:
            return fn(client, *a, **kw)
        except grpc.RpcError as e:
            raise from_rpc_error(e, client.addr) from None
    return wrapper


# ----------------------------------------------------------------------------- store
@_rpc_errors
def store_cuda(client, tokens: Sequence[int], src, durability: Durability = Durability.MEMORY,
               group_chunks: int | None = None, wait: bool = True):
    """Stores the leading full chunks of ``tokens`` from engine CUDA memory ``src`` (namespace
    layout tensor or :class:`Paged`) straight into reserved arena extents; returns the chunks
    newly stored. RPCs are pipelined with the copies; checksums are computed on the GPU.

    ``wait=False``: returns as soon as every byte is in the arena (``src`` may be reused) with
    a ``Future`` of the stored count; the CommitWrites finish in the background (chunks become
    visible to lookups when it resolves). A failed commit raises from ``Future.result()``."""
    gp = _path(client)
    with gp._lock:
        return _store(gp, tokens, src, Durability(durability), group_chunks or gp.group_chunks, wait)


def _all_of(futures: list[Future]) -> Future:
    """A Future of the sum of ``futures``' results (the first exception wins)."""
    out: Future = Future()
    left = [len(futures)]
    lock = threading.Lock()
    if not futures:
        out.set_result(0)
        return out

    def done(_f):
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            try:
                out.set_result(sum(f.result() for f in futures))
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the Future
                out.set_exception(e)
    for f in futures:
        f.add_done_callback(done)
    return out


def _store(gp: GpuPath, tokens, src, durability: Durability, group: int, wait: bool):
    torch = _torch()
    c = gp.client
    ns = c.namespace
    keys = c.keys(tokens)
    n = len(keys) if isinstance(src, Paged) else min(len(keys), _tokens_of(src) // ns.chunk_tokens)
    if isinstance(src, Paged):
        n = min(n, len(src.specs))
    if n == 0:
        return 0 if wait else _all_of([])
    size = ns.chunk_bytes()
    arena_base = gp._arena_ptr()
    contiguous = None if isinstance(src, Paged) else _contiguous_rows(src, ns, n)
    if contiguous is None and not isinstance(src, Paged):
        src = Paged([_spec_of_tensor(src, ns, i) for i in range(n)])

    def reserve(lo: int, hi: int) -> Future:
        req = local_pb2.ReserveWriteRequest(namespace_id=c.namespace_id, chunks=[
            local_pb2.ChunkToWrite(key=k, key_kind=KeyKind.PREFIX, num_tokens=ns.chunk_tokens,
                                   encoding=Encoding.RAW, payload_bytes=size) for k in keys[lo:hi]])
        return c._reserve.future(req, **gp._rpc_meta())

    groups = _groups(n, group)
    # Every group's ReserveWrite in flight at once: copies of group g start as soon as its
    # answer is back while the daemon serves the others.
    reserves = [reserve(lo, hi) for lo, hi in groups]
    commits: list[Future] = []
    k_set = gp._next_set
    gp._next_set = (k_set + 1) % gp._sets
    if gp._set_busy[k_set] is not None:
        try:
            gp._set_busy[k_set].result()  # that call's commits no longer read these buffers
        except BaseException:  # noqa: BLE001 - reported to that call's caller
            pass
    crc_host = gp.pinned_u32(f"crc{k_set}", n)
    rows_total = n * (contiguous[0][3] if contiguous else 0)
    row_host = gp.pinned_u32(f"rows{k_set}", rows_total) if contiguous else None
    cur = torch.cuda.current_stream(gp.device)
    gp.kernel_stream.wait_stream(cur)  # the engine's writes to src are ordered before our reads
    gp.copy_stream.wait_stream(cur)
    if contiguous is None:
        gp._ensure_staging(size)
    slot_i = 0
    try:
        for gi, (lo, hi) in enumerate(groups):
            resp = reserves[gi].result()
            if resp.lease_id == 0:
                continue
            if not c._same_arena(resp.arena_nonce):
                c._release_later(resp.lease_id)
                raise KVStoreClientError("the daemon restarted during a GPU store; retry")
            arena_base = gp._arena_ptr()
            todo = [s for s in resp.slots if not s.exists]
            crc_slots = []
            for s in todo:
                i = lo + s.index
                dst = arena_base + s.offset
                if contiguous is not None:
                    base, pitch, row, planes = contiguous[i]
                    cuda_ipc.memcpy2d(dst, row, base, pitch, row, planes, gp.copy_stream.cuda_stream)
                    crc_slots.append((i, [base + p * pitch for p in range(planes)], row))
                else:
                    k = slot_i % gp.staging_chunks
                    slot_i += 1
                    buf = gp._staging[k]
                    if gp._staging_free[k] is not None:
                        gp.kernel_stream.wait_event(gp._staging_free[k])
                    transfer.gather(src.specs[i], int(buf.data_ptr()), device=True,
                                    stream=gp.kernel_stream.cuda_stream)
                    cuda_ipc.crc32c_batch([int(buf.data_ptr())], [size], int(crc_host.data_ptr()) + 4 * i,
                                          gp.kernel_stream.cuda_stream)
                    ready = torch.cuda.Event()
                    ready.record(gp.kernel_stream)
                    gp.copy_stream.wait_event(ready)
                    cuda_ipc.memcpy_batch([dst], [int(buf.data_ptr())], [size], gp.copy_stream.cuda_stream)
                    done = torch.cuda.Event()
                    done.record(gp.copy_stream)
                    gp._staging_free[k] = done
            # Contiguous rows: one CRC launch per group over every plane row, folded on the host.
            row_crcs = None
            if crc_slots:
                ptrs = [p for _, rows, _ in crc_slots for p in rows]
                row = crc_slots[0][2]
                row_crcs = row_host[lo * contiguous[0][3]:]
                cuda_ipc.crc32c_batch(ptrs, [row] * len(ptrs), int(row_crcs.data_ptr()),
                                      gp.kernel_stream.cuda_stream)
            k_ev = torch.cuda.Event()
            k_ev.record(gp.kernel_stream)
            c_ev = torch.cuda.Event()
            c_ev.record(gp.copy_stream)
            idx = [lo + s.index for s in todo]
            commits.append(gp._commits.submit(_commit_when_done, gp, resp.lease_id, idx, crc_host, row_crcs,
                                              crc_slots, k_ev, c_ev, durability))
        everything = _all_of(commits)
        gp._set_busy[k_set] = everything
        if wait:
            return everything.result()
        gp.copy_stream.synchronize()  # every byte is in the arena: the engine may reuse src
        gp.kernel_stream.synchronize()
        return everything
    except BaseException:
        for f in commits:
            f.cancel()
        for f in reserves:  # reservations nobody will fill end now, not at their expiry
            try:
                r = f.result()
                if r.lease_id:
                    c._release_later(r.lease_id)
            except Exception:  # noqa: BLE001 - an unanswered reservation expires by itself
                pass
        raise


def _commit_when_done(gp: GpuPath, lease_id: int, idx: list[int], crc_host, row_crcs, crc_slots, k_ev, c_ev,
                      durability: Durability) -> int:
    """Helper thread: waits for a group's copies and checksums, then commits it."""
    c = gp.client
    try:
        k_ev.synchronize()
        c_ev.synchronize()
    except BaseException:
        c._release(local_pb2.ReleaseRequest(lease_ids=[lease_id]), **gp._rpc_meta())
        raise
    crcs = crc_host.numpy().view(np.uint32)
    if row_crcs is not None:
        planes, row = len(crc_slots[0][1]), crc_slots[0][2]
        folded = cuda_ipc.crc32c_fold(row_crcs.numpy().view(np.uint32)[: planes * len(crc_slots)], planes, row)
        for (i, _, _), v in zip(crc_slots, folded):
            crcs[i] = v
    done = c._commit(local_pb2.CommitWriteRequest(lease_id=lease_id, durability=int(durability),
                                                  crc32c=[int(crcs[i]) for i in idx]), **gp._rpc_meta())
    return done.stored


# ----------------------------------------------------------------------------- retrieve
@_rpc_errors
def retrieve_into_cuda(client, tokens: Sequence[int], dst, group_chunks: int | None = None,
                       verify: bool = False) -> int:
    """Places the longest stored prefix of ``tokens``' full chunks into engine CUDA memory
    ``dst`` (namespace-layout tensor or :class:`Paged`); returns the tokens placed. RAW chunks
    cross PCIe once by the copy engine; compressed ones cross as bitstreams and are decoded on
    the GPU in one batched launch per group (``verify``: check their layer CRCs on the host)."""
    gp = _path(client)
    with gp._lock:
        return _retrieve(gp, tokens, dst, group_chunks or gp.group_chunks, verify) * client.namespace.chunk_tokens


def _retrieve(gp: GpuPath, tokens, dst, group: int, verify: bool) -> int:
    torch = _torch()
    c = gp.client
    ns = c.namespace
    keys = c.keys(tokens)
    n = len(keys) if isinstance(dst, Paged) else min(len(keys), _tokens_of(dst) // ns.chunk_tokens)
    if isinstance(dst, Paged):
        n = min(n, len(dst.specs))
    if n == 0:
        return 0
    size = ns.chunk_bytes()
    contiguous = None if isinstance(dst, Paged) else _contiguous_rows(dst, ns, n)
    if contiguous is None and not isinstance(dst, Paged):
        dst = Paged([_spec_of_tensor(dst, ns, i) for i in range(n)])
    arena_base = gp._arena_ptr()

    def lease(lo: int, hi: int) -> Future:
        return c._lease_read.future(local_pb2.LeaseReadRequest(namespace_id=c.namespace_id, keys=keys[lo:hi]),
                                    **gp._rpc_meta())

    groups = _groups(n, group)
    pendings = [lease(lo, hi) for lo, hi in groups]  # all in flight at once
    leases: list[int] = []
    placed = 0
    cur = torch.cuda.current_stream(gp.device)
    gp.copy_stream.wait_stream(cur)
    gp.kernel_stream.wait_stream(cur)
    gp._ensure_staging(size)
    slot_i = 0
    coded: list = []  # compressed chunks, decoded together at the end (their leases stay held)
    keep: list[Any] = []  # device bitstream buffers alive until the streams finish
    try:
        for gi, (lo, hi) in enumerate(groups):
            resp = pendings[gi].result()
            leases.append(resp.lease_id)
            if not c._same_arena(resp.arena_nonce):
                break
            arena_base = gp._arena_ptr()
            stop = False
            for ext in resp.extents:
                i = lo + ext.index
                if not ext.found or i != placed + len(coded):
                    stop = True
                    break
                src = arena_base + ext.offset
                if ext.encoding != Encoding.RAW:
                    coded.append((i, ext))
                    continue
                if coded:  # keep chunk order simple: decode what came before first
                    placed += _decode_group(gp, coded, dst, contiguous, arena_base, size, keep, verify)
                    coded = []
                if contiguous is not None:
                    base, pitch, row, planes = contiguous[i]
                    cuda_ipc.memcpy2d(base, pitch, src, row, row, planes, gp.copy_stream.cuda_stream)
                else:
                    k = slot_i % gp.staging_chunks
                    slot_i += 1
                    buf = gp._staging[k]
                    if gp._staging_free[k] is not None:
                        gp.copy_stream.wait_event(gp._staging_free[k])
                    cuda_ipc.memcpy_batch([int(buf.data_ptr())], [src], [size], gp.copy_stream.cuda_stream)
                    ready = torch.cuda.Event()
                    ready.record(gp.copy_stream)
                    gp.kernel_stream.wait_event(ready)
                    transfer.scatter(int(buf.data_ptr()), dst.specs[i], device=True,
                                     stream=gp.kernel_stream.cuda_stream)
                    done = torch.cuda.Event()
                    done.record(gp.kernel_stream)
                    gp._staging_free[k] = done
                placed += 1
            if stop or placed + len(coded) < hi:
                break
        if coded:  # one batched decode launch for every compressed chunk of the call
            placed += _decode_group(gp, coded, dst, contiguous, arena_base, size, keep, verify)
        cur.wait_stream(gp.copy_stream)
        cur.wait_stream(gp.kernel_stream)
        gp.copy_stream.synchronize()  # the arena extents are read before their leases end
        gp.kernel_stream.synchronize()
    finally:
        for f in pendings[len(leases):]:  # look-ahead leases not used
            try:
                r = f.result()
                if r.lease_id:
                    leases.append(r.lease_id)
            except Exception:  # noqa: BLE001 - an unanswered lease expires by itself
                pass
        for lid in leases:
            c._release_later(lid)
    return placed


def _decode_group(gp: GpuPath, coded, dst, contiguous, arena_base: int, size: int, keep: list, verify: bool) -> int:
    """Bitstreams of ``coded`` cross PCIe (copy engine) and are decoded in one batched launch into
    staging, then moved into the engine layout (2D copy D2D, or the scatter kernel)."""
    torch = _torch()
    from kvstore_native.codec import gpu as gcodec

    lens = [int(ext.length) for _, ext in coded]
    devbuf = torch.empty(sum(lens), dtype=torch.uint8, device=gp.device)
    keep.append(devbuf)
    offs = np.cumsum([0] + lens[:-1]).tolist()
    cuda_ipc.memcpy_batch([int(devbuf.data_ptr()) + o for o in offs], [arena_base + ext.offset for _, ext in coded],
                          lens, gp.copy_stream.cuda_stream)
    ready = torch.cuda.Event()
    ready.record(gp.copy_stream)
    gp.kernel_stream.wait_event(ready)
    outs = torch.empty((len(coded), size), dtype=torch.uint8, device=gp.device)
    keep.append(outs)
    # Headers and indexes are read in place in the arena (host memory): no host copy.
    gcodec.decode_batch_ptrs([arena_base + ext.offset for _, ext in coded], [int(devbuf.data_ptr()) + o for o in offs],
                             lens,
                            [int(outs[j].data_ptr()) for j in range(len(coded))], size,
                            gp.kernel_stream.cuda_stream, verify)
    if contiguous is not None:  # one SM launch moves every decoded chunk into place (D2D)
        _, pitch, row, planes = contiguous[coded[0][0]]
        cuda_ipc.copy_rows([contiguous[i][0] for i, _ in coded], [int(outs[j].data_ptr()) for j in range(len(coded))],
                           pitch, row, row, planes, gp.kernel_stream.cuda_stream)
    else:
        for j, (i, _) in enumerate(coded):
            transfer.scatter(int(outs[j].data_ptr()), dst.specs[i], device=True, stream=gp.kernel_stream.cuda_stream)
    return len(coded)


# ----------------------------------------------------------------------------- layouts
def _tokens_of(t) -> int:
    return int(t.shape[2] if t.dim() == 5 else t.shape[1])


def _contiguous_rows(t, ns, n: int):
    """Copy-engine rows for a contiguous namespace-layout CUDA tensor, else None."""
    torch = _torch()
    if not isinstance(t, torch.Tensor) or not t.is_cuda:
        raise InvalidArgument("the GPU data path takes a CUDA tensor or a Paged source")
    if not t.is_contiguous():
        return None
    elt = t.element_size()
    if t.dim() == 5:  # [layers, 2, tokens, heads, dim]
        planes, tokens_total = t.shape[0] * t.shape[1], t.shape[2]
        per_token = t.shape[3] * t.shape[4] * elt
    elif t.dim() == 3:  # MLA [layers, tokens, dim]
        planes, tokens_total, per_token = t.shape[0], t.shape[1], t.shape[2] * elt
    else:
        raise InvalidArgument(f"unexpected KV tensor rank {t.dim()}")
    if planes * ns.chunk_tokens * per_token != ns.chunk_bytes():
        raise InvalidArgument(f"tensor shape {tuple(t.shape)} does not match the namespace's chunk layout")
    pitch = tokens_total * per_token
    row = ns.chunk_tokens * per_token
    base = int(t.data_ptr())
    return [(base + i * row, pitch, row, planes) for i in range(n)]


def _spec_of_tensor(t, ns, i: int) -> PlaneSpec:
    """A strided (non-contiguous) namespace-layout tensor as per-chunk plane specs."""
    elt = t.element_size()
    if t.dim() == 5:
        planes = [t[l, k] for l in range(t.shape[0]) for k in range(t.shape[1])]
    else:
        planes = [t[l].unsqueeze(1) for l in range(t.shape[0])]
    p0 = planes[0]
    start = i * ns.chunk_tokens
    return PlaneSpec([int(p.data_ptr()) for p in planes], list(range(start, start + ns.chunk_tokens)),
                     int(p0.shape[1]), int(p0.shape[2]) * elt, p0.stride(0) * elt, p0.stride(1) * elt)


# ----------------------------------------------------------------------------- HBM tier
@dataclass
class HbmPoolMapping:
    """A client's mapping of the daemon's HBM pool: opened once from its IPC handle; chunks
    are ``(offset, length)`` extents inside it (leased by the daemon like arena extents)."""

    base: int
    size: int
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, handle: bytes, size: int) -> "HbmPoolMapping":
        return cls(cuda_ipc.ipc_open(handle), size)

    def load(self, offset: int, length: int, dst, ns=None, chunk: int = 0, stream: int = 0) -> None:
        """Device-to-device: the pool extent into ``dst`` (a ``PlaneSpec`` -> scatter kernel; a
        contiguous namespace-layout tensor -> one 2D copy of chunk ``chunk``; an int -> a flat copy)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"extent [{offset}, {offset + length}) lies outside the {self.size}-byte pool")
        src = self.base + offset
        if isinstance(dst, PlaneSpec):
            transfer.scatter(src, dst, device=True, stream=stream)
        elif isinstance(dst, int):
            cuda_ipc.memcpy_batch([dst], [src], [length], stream)
        else:
            base, pitch, row, planes = _contiguous_rows(dst, ns, chunk + 1)[chunk]
            cuda_ipc.memcpy2d(base, pitch, src, row, row, planes, stream)

    def load_many(self, extents: Sequence[tuple[int, int]], dst, ns, first_chunk: int = 0, stream: int = 0) -> None:
        """Device-to-device: pool extents ``[(offset, length), ...]`` into consecutive chunks of
        the contiguous namespace-layout tensor ``dst`` from ``first_chunk`` on, in one kernel launch."""
        rows = _contiguous_rows(dst, ns, first_chunk + len(extents))[first_chunk:]
        for off, n in extents:
            if off < 0 or off + n > self.size or n != ns.chunk_bytes():
                raise InvalidArgument(f"extent [{off}, {off + n}) is not a chunk inside the {self.size}-byte pool")
        _, pitch, row, planes = rows[0]
        cuda_ipc.copy_rows([r[0] for r in rows], [self.base + off for off, _ in extents], pitch, row, row, planes, stream)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            cuda_ipc.ipc_close(self.base)


def store_encoded(client, keys: Sequence[bytes], blobs: Sequence[bytes]) -> int:
    """Stores already-encoded chunk bitstreams (``Encoding.CODEC``; e.g. from the GPU encoder)
    under ``keys`` through the same-host arena; returns the chunks newly stored."""
    ns = client.namespace
    req = local_pb2.ReserveWriteRequest(namespace_id=client.namespace_id, chunks=[
        local_pb2.ChunkToWrite(key=k, key_kind=KeyKind.PREFIX, num_tokens=ns.chunk_tokens, encoding=Encoding.CODEC,
                               payload_bytes=len(b)) for k, b in zip(keys, blobs)])
    meta = dict(metadata=client._metadata, timeout=client.timeout_s)
    resp = client._reserve(req, **meta)
    if resp.lease_id == 0:
        return 0
    if not client._same_arena(resp.arena_nonce):
        client._release_later(resp.lease_id)
        raise KVStoreClientError("the daemon restarted during the store; retry")
    for s in resp.slots:
        if not s.exists:
            client.arena.view(s.offset, s.length)[:] = np.frombuffer(blobs[s.index], dtype=np.uint8)
    return client._commit(local_pb2.CommitWriteRequest(lease_id=resp.lease_id), **meta).stored
