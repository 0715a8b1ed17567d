"""GPU -> arena stores of the GPU data path (kvstore_client.gpu): pipelined ReserveWrite /
copy-engine copies (or D2D gather kernel + copy) / GPU CRC32C / CommitWrite."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from typing import Sequence

import grpc
import numpy as np

from kvstore_native import cuda_ipc, transfer
from kvstore_wire._proto.kvstore.v1 import local_pb2
from kvstore_wire.crc import crc32c
from kvstore_wire.types import Durability, Encoding, KeyKind

from .errors import is_exhausted
from .gpu_layout import Paged, _contiguous_rows, _spec_of_tensor, _torch, _whole_chunks
from .gpu_session import GpuSession
from .gpu_state import GROW_STORE_GROUPS_FROM, ArenaChanged, GpuPath, _all_of, _groups, _path, _rpc_errors


@_rpc_errors
def store_cuda(client, tokens: Sequence[int], src, durability: Durability = Durability.MEMORY,
               group_chunks: int | None = None, wait: bool = True, stream=None):
    """Stores the leading full chunks of ``tokens`` from engine CUDA memory ``src`` (namespace
    layout tensor or :class:`Paged`) straight into reserved arena extents; returns the chunks
    newly stored. RPCs are pipelined with the copies; checksums are computed on the GPU.

    ``wait=False``: returns as soon as every byte is in the arena (``src`` may be reused) with
    a ``Future`` of the stored count; the CommitWrites finish in the background (chunks become
    visible to lookups when it resolves). A failed commit raises from ``Future.result()``.
    ``stream``: the engine's stream whose writes to ``src`` come first (default: the current one)."""
    gp = _path(client)
    with gp._lock:
        return _store(gp, tokens, src, Durability(durability), group_chunks or gp.group_chunks, wait, stream)


def _store(gp: GpuPath, tokens, src, durability: Durability, group: int, wait: bool, stream=None):
    torch = _torch()
    c = gp.client
    ns = c.namespace
    keys = c.keys(tokens)
    n = _whole_chunks(keys, src, ns.chunk_tokens)
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

    groups = _groups(n, group, gp.store_group_growth if size >= GROW_STORE_GROUPS_FROM else 1)
    # Every group's ReserveWrite in flight at once: copies of group g start as soon as its
    # answer is back while the daemon serves the others. If the daemon refuses a reservation
    # with RESOURCE_EXHAUSTED (the tenant's reserved-bytes quota, or no arena room) the rest
    # goes one window at a time: reserve, copy, commit; refused again, first wait for our own
    # commits (they end our reservations), then halve the window. One chunk refused with
    # nothing of ours outstanding: ResourceExhausted (the routed client then streams).
    todo_ranges = deque((lo, hi, reserve(lo, hi)) for lo, hi in groups)
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
    cur = stream if stream is not None else torch.cuda.current_stream(gp.device)
    gp.kernel_stream.wait_stream(cur)  # the engine's writes to src are ordered before our reads
    gp.copy_stream.wait_stream(cur)
    if contiguous is None:
        gp._ensure_staging(size)
    slot_i = 0
    window = 0      # 0: pipelined; else chunks per reservation once the daemon refused one
    refused_at = -1  # the first chunk of the last refused reservation
    try:
        while todo_ranges:
            lo, hi, fut = todo_ranges.popleft()
            try:
                resp = fut.result()
            except grpc.RpcError as e:
                if not is_exhausted(e):
                    raise
                mine = [f for f in commits if not f.done()]
                for f in commits:
                    f.result()              # our commits end our reservations (errors raise)
                ahead = [lid for lid in (_answered_lease(f) for _, _, f in todo_ranges) if lid]
                if ahead:   # reservations asked for ahead are given back before asking again
                    c._release(local_pb2.ReleaseRequest(lease_ids=ahead), **gp._rpc_meta())
                end = todo_ranges[-1][1] if todo_ranges else hi
                if mine or ahead:           # we held some of it ourselves: the same window again
                    window = window or hi - lo
                elif hi - lo > 1:
                    window = max(1, (hi - lo) // 2)
                elif refused_at == lo:      # one chunk, refused twice with nothing of ours held
                    raise
                else:                       # (a commit may have ended just after the refusal)
                    window = 1
                refused_at = lo
                todo_ranges = deque([(lo, min(lo + window, end), reserve(lo, min(lo + window, end)))])
                rest = (min(lo + window, end), end)
                if rest[0] < rest[1]:
                    todo_ranges.append((rest[0], rest[1], None))
                continue
            if window and todo_ranges and todo_ranges[0][2] is None:   # the next window, asked for now
                nlo, end = todo_ranges.popleft()[:2]
                todo_ranges.appendleft((nlo, min(nlo + window, end), reserve(nlo, min(nlo + window, end))))
                if nlo + window < end:
                    todo_ranges.insert(1, (nlo + window, end, None))
            if resp.lease_id == 0:
                continue
            if not c._same_arena(resp.arena_nonce):
                c._release_later(resp.lease_id)
                raise ArenaChanged("the daemon restarted during a GPU store; retry")
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
            places = [(keys[lo + s.index], s.offset, s.length) for s in todo]
            commits.append(gp._commits.submit(_commit_when_done, gp, resp.lease_id, idx, crc_host, row_crcs,
                                              crc_slots, k_ev, c_ev, durability, places, resp.arena_nonce))
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
        for _, _, f in todo_ranges:  # reservations nobody will fill end now, not at their expiry
            lid = _answered_lease(f)
            if lid:
                c._release_later(lid)
        raise


def _answered_lease(f: Future | None) -> int:
    """The reservation lease of a ReserveWrite answer; 0 when none was granted (or asked for)."""
    if f is None:
        return 0
    try:
        return f.result().lease_id
    except Exception:  # noqa: BLE001 - a refused or unanswered reservation holds nothing
        return 0


def _commit_when_done(gp: GpuPath, lease_id: int, idx: list[int], crc_host, row_crcs, crc_slots, k_ev, c_ev,
                      durability: Durability, places=(), nonce: bytes = b"") -> int:
    """Helper thread: waits for a group's copies and checksums, then commits it (and
    remembers where the chunks are, for speculative loads)."""
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
    # The CRCs were computed on the GPU over the source of the copies: the daemon takes them
    # unread (the extents were zeroed where stale; reads verify), sparing a CPU pass per byte.
    done = c._commit(local_pb2.CommitWriteRequest(lease_id=lease_id, durability=int(durability),
                                                  crc32c=[int(crcs[i]) for i in idx],
                                                  skip_verify=gp.skip_commit_verify), **gp._rpc_meta())
    gp.remember([(k, off, length, int(crcs[i])) for (k, off, length), i in zip(places, idx)], nonce)
    return done.stored


def store_encoded(client, keys: Sequence[bytes], blobs: Sequence[bytes]) -> int:
    """Stores already-encoded chunk bitstreams (``Encoding.CODEC``; e.g. from the GPU encoder)
    under ``keys`` through the same-host arena; returns the chunks newly stored."""
    client = GpuSession.of(client)
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
        raise ArenaChanged("the daemon restarted during the store; retry")
    crcs = []
    for s in resp.slots:
        if not s.exists:
            dst = client.arena.view(s.offset, s.length)
            dst[:] = np.frombuffer(blobs[s.index], dtype=np.uint8)
            crcs.append(crc32c(dst))      # the daemon publishes only what matches (docs/security.md)
    return client._commit(local_pb2.CommitWriteRequest(lease_id=resp.lease_id, crc32c=crcs), **meta).stored
