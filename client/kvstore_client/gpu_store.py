"""GPU -> arena stores of the GPU data path (kvstore_client.gpu): copy-engine copies (or D2D
gather kernel + copy) into write-ahead reservations (``gpu_pool``) or pipelined keyed
ReserveWrites, GPU CRC32C, CommitWrite."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from typing import Sequence

import grpc
import numpy as np

from kvstore_native import cuda_ipc, transfer
from kvstore_wire._proto.kvstore.v1 import local_pb2
from kvstore_wire.crc import crc32c
from kvstore_wire.types import DType, Durability, Encoding, KeyKind

from .errors import is_exhausted
from .gpu_pool import WritePool
from .gpu_layout import Paged, _contiguous_rows, _spec_of_tensor, _torch, _whole_chunks
from .gpu_session import GpuSession
from .gpu_state import (GROW_STORE_GROUPS_FROM, ArenaChanged, GpuPath, _all_of, _groups, _path, _rpc_errors,
                        commit_groups)


@_rpc_errors
def store_cuda(client, tokens: Sequence[int], src, durability: Durability = Durability.MEMORY,
               group_chunks: int | None = None, wait: bool = True, stream=None, level: int | None = None,
               keys: Sequence[bytes] | None = None, lanes: int | None = None):
    """Stores the leading full chunks of ``tokens`` from engine CUDA memory ``src`` (namespace
    layout tensor or :class:`Paged`) straight into arena extents; returns the chunks newly
    stored. The extents come from reservations taken ahead of need (``gpu_pool``) when the
    daemon takes unbound ones, else from ReserveWrites pipelined with the copies; checksums
    are computed on the GPU.

    ``wait=False``: returns as soon as every byte is in the arena (``src`` may be reused) with
    a ``Future`` of the stored count; the CommitWrites finish in the background (chunks become
    visible to lookups when it resolves). A failed commit raises from ``Future.result()``.
    ``stream``: the engine's stream whose writes to ``src`` come first (default: the current one).

    ``level`` (a lossy codec level, 1-3): the chunks are encoded on the GPU in one batched pass
    and only their bitstreams cross PCIe, straight into arena extents reserved for exactly their
    sizes (no host copy, no CPU pass over the bytes); the chunks are stored ``Encoding.CODEC``
    and bit-exact with the CPU encoder. ``wait=False``: returns once the bitstreams are in the
    arena, with a ``Future`` of the CommitWrite. ``keys``: the prefix keys of ``tokens`` when the
    caller computed them already (the client's routed calls), else computed here. ``lanes``
    (32, 64 or 128; default ``GpuPath.coded_lanes``, 64): rANS lanes per segment of the
    bitstreams. Chunks stored from GPU memory are mostly loaded back into GPU memory, where 64
    lanes decode with twice the parallelism of 32 for 1-2% more bytes (docs/bitstream.md)."""
    gp = _path(client)
    with gp._lock:
        keys = gp.client.keys(tokens) if keys is None else list(keys)
        if level is not None:
            return _store_coded(gp, keys, src, int(level), Durability(durability), wait, stream,
                                lanes=gp.coded_lanes if lanes is None else lanes)
        return _store(gp, keys, src, Durability(durability), group_chunks or gp.group_chunks, wait, stream)


def _resolved(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def _store_coded(gp: GpuPath, keys, src, level: int, durability: Durability, wait: bool = True, stream=None, *,
                 lanes: int):
    """GPU encode of the leading full chunks (``keys``) from ``src``, each bitstream copied
    by the encoder into the arena extent reserved for it once its size is known."""
    from kvstore_native.codec import CodecError
    from kvstore_native.codec import gpu as gcodec
    from kvstore_native.codec.format import CodecLevel

    from .errors import InvalidArgument

    torch = _torch()
    c = gp.client
    ns = c.namespace
    if level not in (int(CodecLevel.NEAR_LOSSLESS), int(CodecLevel.DEFAULT), int(CodecLevel.AGGRESSIVE)):
        raise InvalidArgument(f"GPU encode takes a lossy codec level 1-3, got {level} (lossless encodes on the CPU)")
    from kvstore_native.codec import check_lanes

    try:
        lanes = check_lanes(lanes, level)
    except CodecError as e:
        raise InvalidArgument(str(e)) from None
    n = _whole_chunks(keys, src, ns.chunk_tokens)
    if n == 0:
        return 0 if wait else _resolved(0)
    size = ns.chunk_bytes()
    contiguous = None if isinstance(src, Paged) else _contiguous_rows(src, ns, n)
    if contiguous is None and not isinstance(src, Paged):
        src = Paged([_spec_of_tensor(src, ns, i) for i in range(n)])
    ks = gp.kernel_stream
    cur = stream if stream is not None else torch.cuda.current_stream(gp.device)
    ks.wait_stream(cur)  # the engine's writes to src come first
    with torch.cuda.stream(ks):
        stage = torch.empty((n, size), dtype=torch.uint8, device=gp.device)
    base = int(stage.data_ptr())
    # Each chunk contiguous on the device (the encoder's input): copy-engine 2D copies from a
    # contiguous tensor, the gather kernel from paged memory.
    for i in range(n):
        if contiguous is not None:
            b, pitch, row, planes = contiguous[i]
            cuda_ipc.memcpy2d(base + i * size, row, b, pitch, row, planes, ks.cuda_stream)
        else:
            transfer.gather(src.specs[i], base + i * size, device=True, stream=ks.cuda_stream)
    tdt = {DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16, DType.FLOAT32: torch.float32}.get(ns.dtype)
    if tdt is None:
        raise InvalidArgument(f"the codec does not encode {ns.dtype.name} KV (float16, bfloat16 or float32)")
    shape = ns.chunk_shape()
    chunks = [stage[i].view(tdt).view(shape) for i in range(n)]
    reserved: list = []

    def place(sizes: list[int]) -> list[int]:
        req = local_pb2.ReserveWriteRequest(namespace_id=c.namespace_id, chunks=[
            local_pb2.ChunkToWrite(key=k, key_kind=KeyKind.PREFIX, num_tokens=ns.chunk_tokens,
                                   encoding=Encoding.CODEC, payload_bytes=sz) for k, sz in zip(keys[:n], sizes)])
        resp = c._reserve(req, **gp._rpc_meta())
        if resp.lease_id == 0:
            return [0] * n
        if not c._same_arena(resp.arena_nonce):
            c._release_later(resp.lease_id)
            raise ArenaChanged("the daemon restarted during a GPU store; retry")
        reserved.append(resp)
        arena = gp._arena_ptr()
        ptrs = [0] * n
        for sl in resp.slots:
            if not sl.exists:
                if sl.length != sizes[sl.index]:
                    raise CodecError(f"the daemon reserved {sl.length} bytes for a {sizes[sl.index]}-byte bitstream")
                ptrs[sl.index] = arena + sl.offset
        return ptrs

    try:
        spans = gcodec.encode_batch_placed(chunks, level, place, layout=int(ns.layout), stream=ks, lanes=lanes)
    except BaseException:
        if reserved:   # the extents go back before this returns: a retry reserves them afresh
            try:
                c._release(local_pb2.ReleaseRequest(lease_ids=[reserved[0].lease_id]), **gp._rpc_meta())
            except grpc.RpcError:
                pass   # an unreleased write lease expires by itself; nothing was published
        raise
    finally:
        stage.record_stream(ks)
    cur.wait_stream(ks)
    if not reserved:
        return 0 if wait else _resolved(0)
    resp = reserved[0]
    nonce = c._core.nonce

    def commit() -> int:
        # The CRC32Cs were computed on the GPU over the payloads the copies read (and on the host
        # over the headers written in place): the daemon takes them unread, as for RAW stores.
        done = c._commit(local_pb2.CommitWriteRequest(lease_id=resp.lease_id, durability=int(durability),
                                                      crc32c=[spans[sl.index][1] for sl in resp.slots if not sl.exists],
                                                      skip_verify=gp.skip_commit_verify), **gp._rpc_meta())
        gp.remember([(keys[sl.index], sl.offset, sl.length, spans[sl.index][1]) for sl in resp.slots
                     if not sl.exists], nonce, coded=True)   # later loads of these chunks may go without a lease
        return done.stored
    return commit() if wait else gp._commits.submit(commit)


def _store(gp: GpuPath, keys, src, durability: Durability, group: int, wait: bool, stream=None):
    torch = _torch()
    c = gp.client
    ns = c.namespace
    n = _whole_chunks(keys, src, ns.chunk_tokens)
    if n == 0:
        return 0 if wait else _all_of([])
    size = ns.chunk_bytes()
    contiguous = None if isinstance(src, Paged) else _contiguous_rows(src, ns, n)
    if contiguous is None and not isinstance(src, Paged):
        src = Paged([_spec_of_tensor(src, ns, i) for i in range(n)])
    k_set = gp._next_set
    gp._next_set = (k_set + 1) % gp._sets
    if gp._set_busy[k_set] is not None:
        try:
            gp._set_busy[k_set].result()  # that call's commits no longer read these buffers
        except BaseException:  # noqa: BLE001 - reported to that call's caller
            pass
    cp = _Copier(gp, src, contiguous, size, n, k_set)
    cur = stream if stream is not None else torch.cuda.current_stream(gp.device)
    gp.kernel_stream.wait_stream(cur)  # the engine's writes to src are ordered before our reads
    gp.copy_stream.wait_stream(cur)
    pool = gp.write_pool(size)
    if pool is not None:
        commits = _pooled(gp, pool, cp, keys, n, durability, group)
    else:
        commits = _keyed(gp, cp, keys, list(range(n)), durability, group)
    everything = _all_of(commits)
    if pool is not None and gp.refill_after_commits:
        # The pool's refill (a ReserveWrite) is served once this call's commits are answered,
        # so it does not compete with them for the daemon's workers.
        everything.add_done_callback(lambda _f: pool.refill())
    gp._set_busy[k_set] = everything
    if wait:
        return everything.result()
    gp.copy_stream.synchronize()  # every byte is in the arena: the engine may reuse src
    gp.kernel_stream.synchronize()
    return everything


class _Copier:
    """One store call's copies into arena extents and their CRC32Cs on the GPU, group by
    group (a group is what one CommitWrite publishes). Contiguous sources: copy-engine 2D
    copies, one CRC launch per group over every plane row (folded on the host at commit);
    paged ones: gather kernel into a staging ring, CRC of the staged chunk, copy engine."""

    def __init__(self, gp: GpuPath, src, contiguous, size: int, n: int, k_set: int) -> None:
        self.gp, self.src, self.contiguous, self.size = gp, src, contiguous, size
        self.crc_host = gp.pinned_u32(f"crc{k_set}", n)
        self.row_host = gp.pinned_u32(f"rows{k_set}", n * contiguous[0][3]) if contiguous else None
        self._row_at = 0
        self._rows: list = []
        self._slot_i = 0
        if contiguous is None:
            gp._ensure_staging(size)

    def copy(self, i: int, dst: int) -> None:
        """Chunk ``i`` of the source into the arena at address ``dst``."""
        gp = self.gp
        if self.contiguous is not None:
            base, pitch, row, planes = self.contiguous[i]
            cuda_ipc.memcpy2d(dst, row, base, pitch, row, planes, gp.copy_stream.cuda_stream)
            self._rows.append((i, [base + p * pitch for p in range(planes)], row))
            return
        torch = _torch()
        k = self._slot_i % gp.staging_chunks
        self._slot_i += 1
        buf = gp._staging[k]
        if gp._staging_free[k] is not None:
            gp.kernel_stream.wait_event(gp._staging_free[k])
        transfer.gather(self.src.specs[i], int(buf.data_ptr()), device=True, stream=gp.kernel_stream.cuda_stream)
        cuda_ipc.crc32c_batch([int(buf.data_ptr())], [self.size], int(self.crc_host.data_ptr()) + 4 * i,
                              gp.kernel_stream.cuda_stream)
        ready = torch.cuda.Event()
        ready.record(gp.kernel_stream)
        gp.copy_stream.wait_event(ready)
        cuda_ipc.memcpy_batch([dst], [int(buf.data_ptr())], [self.size], gp.copy_stream.cuda_stream)
        done = torch.cuda.Event()
        done.record(gp.copy_stream)
        gp._staging_free[k] = done

    def end_group(self) -> "_Group":
        """Closes the group copied since the last call: launches its row CRCs and records the
        events its commit waits for."""
        torch = _torch()
        gp = self.gp
        rows, self._rows = self._rows, []
        row_crcs = None
        if rows:
            ptrs = [p for _, r, _ in rows for p in r]
            row_crcs = self.row_host[self._row_at:]
            self._row_at += len(ptrs)
            cuda_ipc.crc32c_batch(ptrs, [rows[0][2]] * len(ptrs), int(row_crcs.data_ptr()),
                                  gp.kernel_stream.cuda_stream)
        k_ev = torch.cuda.Event()
        k_ev.record(gp.kernel_stream)
        c_ev = torch.cuda.Event()
        c_ev.record(gp.copy_stream)
        return _Group(self.crc_host, row_crcs, rows, k_ev, c_ev)


class _Group:
    def __init__(self, crc_host, row_crcs, rows, k_ev, c_ev) -> None:
        self.crc_host, self.row_crcs, self.rows, self.k_ev, self.c_ev = crc_host, row_crcs, rows, k_ev, c_ev

    def crcs(self):
        """Waits for the group's copies and checksums; the CRC32C of every chunk (by index)."""
        self.k_ev.synchronize()
        self.c_ev.synchronize()
        crcs = self.crc_host.numpy().view(np.uint32)
        if self.rows:
            planes, row = len(self.rows[0][1]), self.rows[0][2]
            folded = cuda_ipc.crc32c_fold(self.row_crcs.numpy().view(np.uint32)[: planes * len(self.rows)], planes, row)
            for (i, _, _), v in zip(self.rows, folded):
                crcs[i] = v
        return crcs


def _pooled(gp: GpuPath, pool: WritePool, cp: _Copier, keys, n: int, durability: Durability, group: int) -> list:
    """Copies into write-ahead slots, then one CommitWrite per lease binding the keys. Chunks
    the presence index lists are skipped (as ReserveWrite reports them). The part the pool
    does not cover is reserved unbound at once, while the pooled part is copied; if the
    daemon refuses that, the pool's own room goes back and the rest is reserved keyed."""
    c = gp.client
    pres = c.presence
    nid = c.namespace_id
    todo = [i for i in range(n) if not (pres is not None and pres.probe(nid, keys[i]))]
    pool.note_call(len(todo))
    taken = pool.take(len(todo))
    have = sum(len(slots) for _, slots in taken)
    extra = pool.reserve(len(todo) - have) if have < len(todo) else None
    if not gp.refill_after_commits:
        pool.refill()
    commits: list[Future] = []
    unsent = [le for le, _ in taken]
    try:
        pos = 0
        for le, slots in taken:
            commits.append(_copy_bound(gp, pool, cp, le, slots, keys, todo[pos:pos + len(slots)], durability))
            unsent.remove(le)
            pos += len(slots)
        if extra is None:
            return commits
        try:
            resp = extra.result()
        except grpc.RpcError as e:
            if not is_exhausted(e):
                raise
            resp = None
        if resp is not None and resp.lease_id:
            if not c._same_arena(resp.arena_nonce):
                c._release_later(resp.lease_id)
                raise ArenaChanged("the daemon restarted during a GPU store; retry")
            le = pool.lease_of(resp)
            slots, le.free = le.free, []
            unsent.append(le)
            commits.append(_copy_bound(gp, pool, cp, le, slots, keys, todo[pos:], durability))
            unsent.remove(le)
            return commits
        # No room for the rest that way: our commits end our reservations, the pool's room is
        # given back, and the rest goes through keyed reservations (windowed when refused).
        pool.drain()
        for f in commits:
            f.result()
        return commits + _keyed(gp, cp, keys, todo[pos:], durability, group)
    except BaseException:
        for le in unsent:   # unbound: nothing of what we copied into them is visible
            pool.retire(le)
        raise


def _copy_bound(gp: GpuPath, pool: WritePool, cp: _Copier, le, slots, keys, idx: list[int],
                durability: Durability) -> Future:
    """Copies chunks ``idx`` into ``le``'s ``slots`` and binds them in shrinking groups
    (``commit_groups``): each group's CommitWrite goes out once its copies and checksums are
    done, while the later groups still cross PCIe. The future of the chunks stored."""
    base = gp._arena_ptr()
    commits: list[Future] = []
    # (A failure part way: the groups submitted bind their slots; the caller retires the
    # lease, released once those commits are answered, and the rest are never bound.)
    for lo, hi in commit_groups(len(slots), cp.size, gp.commit_tail_bytes):
        for s, i in zip(slots[lo:hi], idx[lo:hi]):
            cp.copy(i, base + s.offset)
        g = cp.end_group()
        pool.begin(le)
        try:
            commits.append(gp._commits.submit(_commit_bound_when_done, gp, pool, le,
                                              list(zip(slots[lo:hi], idx[lo:hi])), keys, g, durability))
        except BaseException:
            pool.end(le, None)
            raise
    return _all_of(commits)


def _commit_bound_when_done(gp: GpuPath, pool: WritePool, le, placed, keys, g: "_Group",
                            durability: Durability) -> int:
    """Helper thread: waits for one lease's copies and checksums, then binds the keys to its
    slots (``keep_lease``: the daemon keeps the lease's other slots for later stores and
    ends it once every slot is bound)."""
    c = gp.client
    renewed = None
    try:
        crcs = g.crcs()
        sent = time.time()
        try:
            done = c._commit(local_pb2.CommitWriteRequest(
                lease_id=le.lease_id, durability=int(durability), skip_verify=gp.skip_commit_verify, keep_lease=True,
                bindings=[local_pb2.Binding(slot=s.index, key=keys[i], crc32c=int(crcs[i])) for s, i in placed]),
                **gp._rpc_meta())
        except grpc.RpcError as e:   # a failed CommitWrite ends the lease on the daemon
            pres = c.presence
            if e.code() == grpc.StatusCode.NOT_FOUND and (pres is None or pres.stale()):
                c.arena_changed = True
                raise ArenaChanged("the daemon restarted during a GPU store; retry") from None
            raise
        renewed = sent + c.lease_ttl_s
    except BaseException:
        c._release_later(le.lease_id)   # (a copy failed: the slots written are never bound)
        raise
    finally:
        pool.end(le, renewed)
    existed = set(done.existed_slots)
    gp.remember([(keys[i], s.offset, s.length, int(crcs[i])) for s, i in placed if s.index not in existed],
                le.nonce)
    return done.stored


def _keyed(gp: GpuPath, cp: _Copier, keys, order: list[int], durability: Durability, group: int) -> list:
    """Keyed reservations for chunks ``order`` (indices into ``keys``), pipelined with the
    copies; the commits' futures."""
    c = gp.client
    ns = c.namespace
    size = cp.size
    n = len(order)
    if n == 0:
        return []

    def reserve(lo: int, hi: int) -> Future:
        req = local_pb2.ReserveWriteRequest(namespace_id=c.namespace_id, chunks=[
            local_pb2.ChunkToWrite(key=keys[j], key_kind=KeyKind.PREFIX, num_tokens=ns.chunk_tokens,
                                   encoding=Encoding.RAW, payload_bytes=size) for j in order[lo:hi]])
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
            filled = [s for s in resp.slots if not s.exists]
            for s in filled:
                cp.copy(order[lo + s.index], arena_base + s.offset)
            g = cp.end_group()
            idx = [order[lo + s.index] for s in filled]
            places = [(keys[i], s.offset, s.length) for i, s in zip(idx, filled)]
            commits.append(gp._commits.submit(_commit_when_done, gp, resp.lease_id, idx, g, durability, places,
                                              resp.arena_nonce))
        return commits
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


def _commit_when_done(gp: GpuPath, lease_id: int, idx: list[int], g: "_Group", durability: Durability,
                      places=(), nonce: bytes = b"") -> int:
    """Helper thread: waits for a group's copies and checksums, then commits it (and
    remembers where the chunks are, for speculative loads)."""
    c = gp.client
    try:
        crcs = g.crcs()
    except BaseException:
        c._release(local_pb2.ReleaseRequest(lease_ids=[lease_id]), **gp._rpc_meta())
        raise
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
