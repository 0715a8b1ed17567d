"""Arena -> GPU loads of the GPU data path (kvstore_client.gpu): pipelined LeaseRead / copy-engine
copies (or copy + D2D scatter kernel) / batched GPU decode of compressed chunks straight into
the engine's layout."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any, Sequence

import numpy as np

from kvstore_native import cuda_ipc, transfer
from kvstore_wire._proto.kvstore.v1 import local_pb2
from kvstore_wire.keys import PrefixKeys
from kvstore_wire.presence import fastest, tier_bit
from kvstore_wire.types import Encoding, Tier

from .gpu_layout import Paged, _contiguous_rows, _spec_of_tensor, _torch, _whole_chunks, decode_map
from .gpu_state import GpuPath, _groups, _path, _rpc_errors

log = logging.getLogger(__name__)


@_rpc_errors
def retrieve_into_cuda(client, tokens: Sequence[int], dst, group_chunks: int | None = None,
                       verify: bool = False, stream=None, keys: Sequence[bytes] | None = None) -> int:
    """Places the longest stored prefix of ``tokens``' full chunks into engine CUDA memory
    ``dst`` (namespace-layout tensor or :class:`Paged`); returns the tokens placed. RAW chunks
    cross PCIe once by the copy engine; compressed ones cross as bitstreams and are decoded on
    the GPU straight into ``dst``'s layout, batched, only inside the prefix whose bitstreams
    landed with their stored CRC32C (``_load_coded``; ``verify``: layer CRCs checked on the
    host first).
    Every arena extent's CRC32C is checked on the GPU over the bytes that landed (so the
    daemon skips its CPU check, ``client_verifies``); a chunk that fails ends the prefix
    placed here and is read once more through the daemon's own check, which drops a bad copy.
    Chunks whose extents this client saw last (``GpuPath.speculate``) cross PCIe into device
    staging while the LeaseRead is in flight and move into ``dst`` once it names the same
    extent; ``dst`` past the placed prefix is never written by a guess. Without an HBM pool
    mapped, the leading chunks whose extents this client saw and which the presence index
    still lists in DRAM load without any RPC (``_unleased``: proved in staging first).
    Chunks the daemon's HBM tier holds load device-to-device from its pool (mapped once).
    ``stream``: the engine's stream that reads ``dst`` afterwards (default: the current one).
    ``keys``: the prefix keys of ``tokens`` when the caller has them (the client's routed
    calls pass a ``PrefixKeys``, hashed as read, so an HBM load hashes later chunks while
    earlier ones copy), else hashed here the same way."""
    gp = _path(client)
    with gp._lock:
        if keys is None:
            keys = PrefixKeys(gp.client.namespace_id, tokens, gp.client.namespace.chunk_tokens)
        elif not isinstance(keys, PrefixKeys):
            keys = list(keys)
        return _retrieve(gp, keys, dst, group_chunks or gp.group_chunks, verify, stream) * gp.client.namespace.chunk_tokens


def _retrieve(gp: GpuPath, keys, dst, group: int, verify: bool, stream=None) -> int:
    torch = _torch()
    c = gp.client
    ns = c.namespace
    n = _whole_chunks(keys, dst, ns.chunk_tokens)
    if n == 0:
        return 0
    size = ns.chunk_bytes()
    contiguous = None if isinstance(dst, Paged) else _contiguous_rows(dst, ns, n)
    if contiguous is None and not isinstance(dst, Paged):
        dst = Paged([_spec_of_tensor(dst, ns, i) for i in range(n)])
    arena_base = gp._arena_ptr()
    pool = gp.pool()   # the daemon's HBM tier, mapped: its hits load device-to-device
    cur = stream if stream is not None else torch.cuda.current_stream(gp.device)
    # The leading chunks this client saw in the arena and the presence index lists there load
    # without any RPC; the rest (misses, other tiers, a chunk that moved) through leases. Not
    # with the daemon's HBM pool mapped: a leased read promotes arena hits into it, and later
    # loads then come device-to-device, far faster than PCIe.
    start = 0
    if gp.lease_free and pool is not None:   # the pool's chunks proven by its generation counters
        start = _unleased_hbm(gp, keys, n, dst, contiguous, pool, cur)
    elif gp.lease_free:
        start = _unleased(gp, keys, n, dst, contiguous, size, arena_base, cur)
        if start < n:   # then the compressed ones, likewise
            start += _unleased_coded(gp, keys, start, n, dst, contiguous, arena_base, cur)
    if start == n:
        return n

    def lease(lo: int, hi: int) -> Future:
        return c._lease_read.future(local_pb2.LeaseReadRequest(namespace_id=c.namespace_id, keys=keys[lo:hi],
                                                               device_pool=pool is not None,
                                                               client_verifies=gp.client_verifies),
                                    **gp._rpc_meta())

    chk = _Checks(gp, n, contiguous[0][3] if contiguous else 0) if gp.client_verifies else None
    # Chunks whose extents this client saw last are copied into device staging now, while the
    # LeaseRead is in flight; each is used only if its lease names the same extent and CRC.
    spec = (gp.recall(keys[:n], c._core.nonce, size, max(1, gp.staging_bytes // size))
            if chk is not None and gp.speculate and start == 0 else [])
    groups = [(0, len(spec))] + ([(len(spec), n)] if len(spec) < n else []) if spec else \
        [(start + lo, start + hi) for lo, hi in _groups(n - start, group, gp.group_growth)]
    pendings = [lease(lo, hi) for lo, hi in groups]  # all in flight at once
    spec_ptr = 0
    if spec:
        spec_ptr = int(gp.spec_staging(len(spec) * size).data_ptr())
        cuda_ipc.memcpy_batch([spec_ptr + j * size for j in range(len(spec))],
                              [arena_base + off for off, _, _ in spec], [size] * len(spec),
                              gp.copy_stream.cuda_stream)
        spec_ready = torch.cuda.Event()
        spec_ready.record(gp.copy_stream)
        gp.kernel_stream.wait_event(spec_ready)   # only staged copies are read after this
    seen: list[tuple[bytes, int, int, int]] = []   # RAW arena extents leased: remembered at the end
    seen_coded: list[tuple[bytes, int, int, int]] = []   # CODEC ones, likewise
    leases: list[int] = []
    placed = start
    gp.copy_stream.wait_stream(cur)
    gp.kernel_stream.wait_stream(cur)
    gp._ensure_staging(size)
    slot_i = 0
    coded: list = []  # compressed chunks, decoded together at the end (their leases stay held)
    bad: list[int] = []   # the compressed chunk whose bitstream failed its GPU check (never decoded)
    # GPU CRC32Cs of what landed (``chk``): per chunk (staging buffer, bitstream) or per plane
    # row of a contiguous destination (folded on the host), launched right after the copies.
    try:
        for gi, (lo, hi) in enumerate(groups):
            resp = pendings[gi].result()
            leases.append(resp.lease_id)
            if not c._same_arena(resp.arena_nonce):
                break
            arena_base = gp._arena_ptr()
            stop = False
            pool_rows: list[tuple[int, int]] = []   # (chunk, pool pointer): one D2D launch per group
            pool_seen: list[tuple[bytes, int, int]] = []   # their extents, remembered while leased
            for ext in resp.extents:
                i = lo + ext.index
                if not ext.found or i != placed + len(coded):
                    stop = True
                    break
                if ext.in_device_pool:
                    if (pool is None or resp.device_pool_nonce != gp._pool_nonce or ext.encoding != Encoding.RAW
                            or ext.offset + ext.length > pool.size):
                        stop = True   # another pool (restart), or stored encoded: the arena path serves it next time
                        break
                    if coded:
                        placed, coded, stop = _decoded(gp, coded, placed, dst, contiguous, arena_base, verify,
                                                       chk, bad)
                        if stop:
                            break
                    pool_rows.append((i, pool.base + ext.offset))
                    pool_seen.append((keys[i], ext.offset, ext.length))
                    placed += 1
                    continue
                src = arena_base + ext.offset
                if ext.encoding != Encoding.RAW:
                    if ext.encoding == Encoding.CODEC:
                        seen_coded.append((keys[i], ext.offset, ext.length, ext.crc32c))
                    coded.append((i, ext))
                    continue
                seen.append((keys[i], ext.offset, ext.length, ext.crc32c))
                if coded:  # keep chunk order simple: decode what came before first
                    placed, coded, stop = _decoded(gp, coded, placed, dst, contiguous, arena_base, verify,
                                                   chk, bad)
                    if stop:
                        break
                if i < len(spec) and spec[i] == (ext.offset, ext.length, ext.crc32c):
                    # Copied already, into staging: checked there, then moved D2D into place.
                    staged = spec_ptr + i * size
                    chk.whole(i, ext.crc32c, staged, size)
                    if contiguous is not None:
                        base, pitch, row, planes = contiguous[i]
                        cuda_ipc.memcpy2d(base, pitch, staged, row, row, planes, gp.kernel_stream.cuda_stream)
                    else:
                        transfer.scatter(staged, dst.specs[i], device=True, stream=gp.kernel_stream.cuda_stream)
                    placed += 1
                    continue
                if contiguous is not None:
                    base, pitch, row, planes = contiguous[i]
                    cuda_ipc.memcpy2d(base, pitch, src, row, row, planes, gp.copy_stream.cuda_stream)
                    if chk is not None:
                        chk.rows(i, ext.crc32c, [base + p * pitch for p in range(planes)], row)
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
                    if chk is not None:
                        chk.whole(i, ext.crc32c, int(buf.data_ptr()), size)
                    transfer.scatter(int(buf.data_ptr()), dst.specs[i], device=True,
                                     stream=gp.kernel_stream.cuda_stream)
                    done = torch.cuda.Event()
                    done.record(gp.kernel_stream)
                    gp._staging_free[k] = done
                placed += 1
            if chk is not None:
                chk.flush()
            _move_into(pool_rows, dst, contiguous, gp.kernel_stream.cuda_stream)
            gp.remember_pool(pool_seen, pool)
            if stop or bad or placed + len(coded) < hi:
                break
        if coded:  # one batched decode launch for the call's (remaining) compressed chunks
            placed, coded, _ = _decoded(gp, coded, placed, dst, contiguous, arena_base, verify, chk, bad)
        if chk is not None:
            chk.flush()
        cur.wait_stream(gp.copy_stream)
        cur.wait_stream(gp.kernel_stream)
        gp.copy_stream.synchronize()  # the arena extents are read before their leases end
        gp.kernel_stream.synchronize()
        if chk is not None:
            first = chk.first_bad(placed)
            if first is not None:
                placed = first
                _recheck(gp, keys[first])
        if bad and bad[0] == placed:   # a bitstream that failed its check before any decode
            _recheck(gp, keys[bad[0]])
    finally:
        for f in pendings[len(leases):]:  # look-ahead leases not used
            try:
                r = f.result()
                if r.lease_id:
                    leases.append(r.lease_id)
            except Exception:  # noqa: BLE001 - an unanswered lease expires by itself
                pass
        c._release_later(*leases)   # one Release for the call's leases
    gp.remember(seen, c._core.nonce)
    gp.remember(seen_coded, c._core.nonce, coded=True)
    return placed


#: The lease-free HBM load launches its copies in groups of this many chunks, doubling: the
#: first copy starts after a few chunks' keys and checks, and the host hashes and checks each
#: later group while the GPU copies the ones before it.
HBM_FIRST_GROUP = 2
_HBM_BIT = tier_bit(Tier.HBM)   # set in a mask: HBM is the chunk's fastest copy


def _unleased_hbm(gp: GpuPath, keys, n: int, dst, contiguous, pool, cur) -> int:
    """Loads from the daemon's HBM pool without any RPC: the leading chunks whose pool extent
    this client saw through a lease (with the generation counters of its blocks then) and that
    the presence index lists with HBM as their fastest copy. The daemon increments a block's
    counter whenever it allocates pages in it, before writing them, and a chunk's pages are
    never written while it is stored; so a chunk whose counters equal the remembered ones both
    before and after its device-to-device copy is the chunk that was leased, copied intact.
    Chunks are copied straight into ``dst`` (no staging: a staged copy would halve the D2D
    rate), in groups (``HBM_FIRST_GROUP``, doubling): a group's keys (``keys`` may hash as
    read: ``PrefixKeys``), presence and counters are checked while the GPU copies the groups
    before it, and nothing is copied for a chunk that failed its check before the copy. The
    ones whose counters changed by the end end the run, are forgotten and are read through a
    lease by the caller, which overwrites what the copy left in their place. Reads are
    reported to the daemon as hits afterwards. Returns how many chunks were placed."""
    c = gp.client
    presence = c.presence
    gens = pool.gens
    if gens is None or presence is None or presence.stale():
        return 0
    nsid, limit, base = c.namespace_id, pool.size, pool.base
    ks = gp.kernel_stream
    ext: list = []   # (offset, length, first block, counters) of the chunks copied, in order
    m, size, going = 0, HBM_FIRST_GROUP, True
    try:
        while going and m < n:
            hi = min(n, m + size)
            size *= 2
            group = keys[m:hi]
            seen = gp.recall_pool(group, hi - m)
            going = len(seen) == hi - m
            rows: list[tuple[int, int]] = []
            for key, e in zip(group, seen):
                off, length, lo, snap = e
                mask = presence.probe(nsid, key)
                if (not mask or not mask & _HBM_BIT or off + length > limit
                        or gens[lo:lo + len(snap) // 8].tobytes() != snap):
                    going = False
                    break
                rows.append((m + len(rows), base + off))
                ext.append(e)
            if rows:
                if m == 0:
                    ks.wait_stream(cur)   # dst belongs to the engine's stream: what it queued comes first
                _move_into(rows, dst, contiguous, ks.cuda_stream)
                m += len(rows)
        if m:
            ks.synchronize()
    finally:
        if m:
            cur.wait_stream(ks)
    good = 0
    while good < m and gens[ext[good][2]:ext[good][2] + len(ext[good][3]) // 8].tobytes() == ext[good][3]:
        good += 1
    if good < m:   # reused while it was copied: leased again by the caller
        gp.forget(keys[good])
    if good:
        gp.touched(keys[:good], time.monotonic())
    return good


def _unleased_coded(gp: GpuPath, keys, lo: int, n: int, dst, contiguous, arena_base: int, cur) -> int:
    """Compressed loads without any RPC: the chunks from ``lo`` on that this client saw last as
    CODEC bitstreams of this arena and that the presence index lists in DRAM. As for RAW
    chunks (``_unleased``) nothing unproven is placed: the bitstreams cross PCIe into device
    memory and their CRC32Cs are computed on the GPU over the bytes that landed; the decoder
    (which reads only those device bytes, never the arena, and checks each header on the
    device) writes a chunk into ``dst`` only when its CRC32C and every earlier one's equal the
    ones they were stored with (``_load_coded``). The first chunk that fails is forgotten and
    read through a lease by the caller. Returns how many chunks were placed."""
    c = gp.client
    presence = c.presence
    if not gp.client_verifies or presence is None or presence.stale():
        return 0
    ext = gp.recall_coded(keys[lo:n], c._core.nonce, n - lo)
    m = 0
    for key in keys[lo:lo + len(ext)]:
        mask = presence.probe(c.namespace_id, key)
        if not mask or fastest(mask) != Tier.DRAM:
            break
        m += 1
    if m == 0:
        return 0
    ks = gp.kernel_stream
    ks.wait_stream(cur)   # dst belongs to the engine's stream: what it queued comes first
    try:
        r = _load_coded(gp, [arena_base + e[0] for e in ext[:m]], [e[1] for e in ext[:m]], [e[2] for e in ext[:m]],
                        list(range(lo, lo + m)), dst, contiguous, ks)
    finally:
        cur.wait_stream(ks)
    if r.proven < m:   # moved, overwritten or evicted since this client saw it
        gp.forget(keys[lo + r.proven])
    if r.failed is not None and r.failed < r.proven:   # proven bytes that do not decode: read leased
        log.warning("a compressed chunk loaded without a lease did not decode (%s); reading it leased", r.error)
        gp.forget(keys[lo + r.failed])
    if r.placed:
        gp.touched(keys[lo:lo + r.placed], time.monotonic())
    return r.placed


def _load_coded(gp: GpuPath, srcs: list[int], lens: list[int], want: list[int] | None, idx: list[int], dst,
                contiguous, stream, verify_host: bool = False):
    """Bitstreams at host addresses ``srcs`` (arena extents) of the chunks ``idx`` of ``dst``,
    loaded straight into the engine layout (``kvs_cuda_codec_load_mapped``: copies, GPU CRC32Cs
    and the decode pipelined in groups; a chunk decodes only inside the prefix proven against
    ``want``). Returns the ``MappedLoad``; ``stream`` has synchronized."""
    from kvstore_native.codec import _shape_args
    from kvstore_native.codec import gpu as gcodec
    from kvstore_native.codec.format import DType, Layout

    ns = gp.client.namespace
    layout = Layout(int(ns.layout))   # the wire's layout ids are the codec's (as the GPU encoder uses them)
    return gcodec.load_mapped(srcs, lens, DType(int(ns.dtype)), layout, _shape_args(ns.chunk_shape(), layout),
                              decode_map(dst, contiguous, ns, idx), stream.cuda_stream, want_crcs=want,
                              verify_host=verify_host)


def _unleased(gp: GpuPath, keys, n: int, dst, contiguous, size: int, arena_base: int, cur) -> int:
    """Loads without any RPC the leading chunks of ``keys[:n]`` that this client saw last as
    RAW extents of this arena and that the presence index lists with the arena (DRAM) as
    their fastest copy; returns how many were placed (the caller leases the rest).

    Without a lease the daemon may evict, move or overwrite a chunk while it crosses PCIe,
    so nothing unproven reaches ``dst``: each batch lands in device staging, its CRC32Cs are
    computed on the GPU and compared on the host with the ones the chunks were stored with,
    and only the matching leading run is moved into place. The staging is a ring of as many
    batch regions as fit (at least two): while the host checks batch k, the batches after it
    up to the ring's size are already queued on the copy engine, so PCIe never waits for
    the host. The first chunk that does not match ends the run
    and is forgotten; the caller reads it and what follows through leases. A chunk deleted
    before the load is absent from the index and never read this way. The reads are reported
    to the daemon as hits afterwards (``GpuPath.touched``), batched across loads."""
    c = gp.client
    presence = c.presence
    if not gp.client_verifies or presence is None or presence.stale():
        return 0
    ext = gp.recall(keys[:n], c._core.nonce, size, n)
    m = 0
    for key in keys[:len(ext)]:
        mask = presence.probe(c.namespace_id, key)
        if not mask or fastest(mask) != Tier.DRAM:   # absent, overflowed, or served faster from HBM
            break
        m += 1
    if m == 0:
        return 0
    if gp.gated_loads and (contiguous is None or _aligned16(contiguous, m)):
        return _unleased_gated(gp, keys, m, ext, dst, contiguous, size, arena_base, cur)
    torch = _torch()
    per, batches, ways, staging = _ring(gp, m, size, gp.unleased_batch_bytes)
    crc = gp.pinned_u32("unleased-crc", m)
    crc_host = crc.numpy().view(np.uint32)
    mv = gp.move_stream
    mv.wait_stream(cur)   # dst belongs to the engine's stream: moves come after what it queued
    checked: list[Any] = [None] * len(batches)
    moved: list[Any] = [None] * len(batches)

    def region(k: int) -> int:
        return staging + (k % ways) * per * size

    def issue(k: int) -> None:
        lo, hi = batches[k]
        base = region(k)
        if k >= ways:   # the region is free once batch k - ways moved out of it
            gp.copy_stream.wait_event(moved[k - ways])
        _stage(gp, [base + j * size for j in range(hi - lo)], [arena_base + ext[i][0] for i in range(lo, hi)], size,
               int(crc.data_ptr()) + 4 * lo)
        checked[k] = torch.cuda.Event()
        checked[k].record(gp.kernel_stream)

    placed = 0
    try:
        for k in range(min(ways, len(batches))):
            issue(k)
        for k, (lo, hi) in enumerate(batches):
            checked[k].synchronize()
            good = lo
            while good < hi and int(crc_host[good]) == ext[good][2]:
                good += 1
            base = region(k)
            _move_into([(i, base + (i - lo) * size) for i in range(lo, good)], dst, contiguous, mv.cuda_stream)
            moved[k] = torch.cuda.Event()
            moved[k].record(mv)
            placed = good
            if good < hi:   # moved, overwritten or evicted since this client saw it
                gp.forget(keys[good])
                break
            if k + ways < len(batches):
                issue(k + ways)
    finally:
        gp.copy_stream.synchronize()   # nothing of this call still reads the arena or writes staging
        gp.kernel_stream.synchronize()
        mv.synchronize()
        cur.wait_stream(mv)
    if placed:
        gp.touched(keys[:placed], time.monotonic())
    return placed


def _aligned16(contiguous, m: int) -> bool:
    """The contiguous destination's rows of chunks ``[0, m)`` allow the gated row-copy kernel."""
    _, pitch, row, _ = contiguous[0]
    return (pitch | row) % 16 == 0 and all(contiguous[i][0] % 16 == 0 for i in range(m))


def _unleased_gated(gp: GpuPath, keys, m: int, ext, dst, contiguous, size: int, arena_base: int, cur) -> int:
    """``_unleased`` with every check on the device: each batch crosses PCIe into a region of
    the staging ring, its CRC32Cs are computed on the GPU and compared there with the ones the
    chunks were stored with (``prove_prefix``: one int32 in device memory counts the leading
    chunks proven, and stops at the first mismatch for good), and its move into ``dst`` is a
    kernel gated by that count, so it writes only proven chunks. The whole load is queued at
    once (a region is reused once the move out of it ran); the host waits once, at the end,
    and reads how many chunks were placed. Nothing unproven reaches ``dst``: a chunk that
    does not match, and every chunk after it, is left unwritten. Returns the chunks placed."""
    torch = _torch()
    per, batches, ways, staging = _ring(gp, m, size, gp.gated_batch_bytes)
    crc = int(gp.device_u32("gated-crc", m).data_ptr())
    gate_buf = gp.device_u32("gated-gate", 1)
    gate = int(gate_buf.data_ptr())
    out = gp.pinned_u32("gated-placed", 1)
    cs, ks, mv = gp.copy_stream, gp.kernel_stream, gp.move_stream
    mv.wait_stream(cur)   # dst belongs to the engine's stream: moves come after what it queued
    moved: list[Any] = []
    try:
        with torch.cuda.stream(ks):
            gate_buf[:1].zero_()
        for k, (lo, hi) in enumerate(batches):
            base = staging + (k % ways) * per * size
            if k >= ways:   # the region is free once batch k - ways moved out of it
                cs.wait_event(moved[k - ways])
            staged = [base + j * size for j in range(hi - lo)]
            _stage(gp, staged, [arena_base + ext[i][0] for i in range(lo, hi)], size, crc + 4 * lo)
            cuda_ipc.prove_prefix(crc + 4 * lo, [ext[i][2] for i in range(lo, hi)], gate, lo, ks.cuda_stream)
            checked = torch.cuda.Event()
            checked.record(ks)
            mv.wait_event(checked)
            _move_into(list(zip(range(lo, hi), staged)), dst, contiguous, mv.cuda_stream, gate=gate)
            ev = torch.cuda.Event()
            ev.record(mv)
            moved.append(ev)
        cuda_ipc.memcpy_batch([int(out.data_ptr())], [gate], [4], ks.cuda_stream)
    finally:
        cs.synchronize()   # nothing of this call still reads the arena or writes staging
        ks.synchronize()
        mv.synchronize()
        cur.wait_stream(mv)
    placed = int(out[0])
    if placed < m:   # moved, overwritten or evicted since this client saw it
        gp.forget(keys[placed])
    if placed:
        gp.touched(keys[:placed], time.monotonic())
    return placed


def _move_into(rows: list[tuple[int, int]], dst, contiguous, stream: int, gate: int | None = None) -> None:
    """Device-to-device moves of whole chunks ``(chunk, device pointer)`` (HBM-pool extents,
    checked staging, decoded chunks) into the engine layout on ``stream``: one ``copy_rows``
    launch for a contiguous tensor (the fastest D2D form, 81% of a D2D copy on an H200), one
    scatter kernel per chunk for a paged destination. ``gate`` (an int32 device pointer, with
    ``rows`` consecutive chunks): chunk ``i`` is written only if ``i < *gate`` when its kernel runs."""
    if not rows:
        return
    if contiguous is not None:
        _, pitch, row, planes = contiguous[rows[0][0]]
        dsts, srcs = [contiguous[i][0] for i, _ in rows], [src for _, src in rows]
        if gate is None:
            cuda_ipc.copy_rows(dsts, srcs, pitch, row, row, planes, stream)
        else:
            cuda_ipc.copy_rows_gated(dsts, srcs, pitch, row, row, planes, gate, rows[0][0], stream)
    else:
        for i, src in rows:
            transfer.scatter(src, dst.specs[i], device=True, stream=stream,
                             gate=None if gate is None else (gate, i))


def _ring(gp: GpuPath, m: int, size: int, batch_bytes: int) -> tuple[int, list[tuple[int, int]], int, int]:
    """The staging ring of a lease-free load of ``m`` chunks of ``size`` bytes in batches of about
    ``batch_bytes`` (at most half the staging): chunks per batch, the batches, the ring's regions
    (at least two), and the staging's device address (grown to hold them)."""
    per = max(1, min(batch_bytes // size, gp.staging_bytes // size // 2))
    batches = [(lo, min(m, lo + per)) for lo in range(0, m, per)]
    ways = max(2, min(len(batches), gp.staging_bytes // (per * size)))
    return per, batches, ways, int(gp.spec_staging(ways * per * size).data_ptr())


def _stage(gp: GpuPath, staged: list[int], srcs: list[int], size: int, crc_out: int) -> None:
    """Arena chunks ``srcs`` into device staging ``staged`` on the copy stream, then their GPU
    CRC32Cs into ``crc_out`` (uint32 each) on the kernel stream once they landed."""
    torch = _torch()
    cuda_ipc.memcpy_batch(staged, srcs, [size] * len(staged), gp.copy_stream.cuda_stream)
    landed = torch.cuda.Event()
    landed.record(gp.copy_stream)
    gp.kernel_stream.wait_event(landed)
    cuda_ipc.crc32c_batch(staged, [size] * len(staged), crc_out, gp.kernel_stream.cuda_stream)


#: Arena chunks of a contiguous destination are checked in launches of at least this many
#: bytes (a GPU CRC32C of 32 MiB takes ~0.2 ms on an H200, the last launch's exposed time).
BATCH_CHECK_BYTES = 32 << 20


class _Checks:
    """The GPU CRC32Cs of one retrieve's arena chunks, in pinned host buffers, against the
    CRC32C each extent was stored with."""

    def __init__(self, gp: GpuPath, n: int, planes: int) -> None:
        self._gp = gp
        self._whole = gp.pinned_u32("read-crc", n)
        self._rows = gp.pinned_u32("read-row-crc", n * planes) if planes else None
        self._want: dict[int, tuple[int, int, int]] = {}  # chunk -> (stored CRC, planes, row bytes)
        self._run: list[tuple[int, list[int], int]] = []  # consecutive chunks whose check is not launched
        self._run_bytes = 0

    def _after_copy(self) -> int:
        """The kernel stream, ordered after everything issued on the copy stream so far."""
        ev = _torch().cuda.Event()
        ev.record(self._gp.copy_stream)
        self._gp.kernel_stream.wait_event(ev)
        return self._gp.kernel_stream.cuda_stream

    def rows(self, i: int, want: int, ptrs: list[int], row: int) -> None:
        """Chunk ``i`` landed as ``len(ptrs)`` rows of ``row`` bytes (copy stream). Chunks
        ``i, i + 1, ...`` are checked in one launch once ``BATCH_CHECK_BYTES`` have landed (or
        at ``flush``): a launch per chunk would cost more host time than small chunks take to cross."""
        if self._run and self._run[-1][0] + 1 != i:
            self.flush()
        self._run.append((i, ptrs, row))
        self._want[i] = (want, len(ptrs), row)
        self._run_bytes += row * len(ptrs)
        if self._run_bytes >= BATCH_CHECK_BYTES:
            self.flush()

    def flush(self) -> None:
        """Launches the check of the chunks queued by ``rows`` (after their copies)."""
        if not self._run:
            return
        first, planes = self._run[0][0], len(self._run[0][1])
        ptrs = [p for _, rows, _ in self._run for p in rows]
        lens = [row for _, rows, row in self._run for _ in rows]
        cuda_ipc.crc32c_batch(ptrs, lens, int(self._rows.data_ptr()) + 4 * first * planes, self._after_copy())
        self._run, self._run_bytes = [], 0

    def whole(self, i: int, want: int, ptr: int, nbytes: int) -> None:
        """Chunk ``i`` is the ``nbytes`` at device ``ptr`` (the kernel stream already waits
        for its copy)."""
        cuda_ipc.crc32c_batch([ptr], [nbytes], int(self._whole.data_ptr()) + 4 * i, self._gp.kernel_stream.cuda_stream)
        self._want[i] = (want, 0, 0)

    def first_bad(self, placed: int) -> int | None:
        """The first chunk below ``placed`` whose bytes do not match (streams synchronized)."""
        whole = self._whole.numpy().view(np.uint32)
        rows = self._rows.numpy().view(np.uint32) if self._rows is not None else None
        for i in sorted(k for k in self._want if k < placed):
            want, planes, row = self._want[i]
            got = (int(whole[i]) if not planes else
                   int(cuda_ipc.crc32c_fold(rows[i * planes:(i + 1) * planes], planes, row)[0]))
            if got != want:
                log.warning("chunk %d of a GPU load failed its CRC32C check (%#010x, stored with %#010x); "
                            "it and the chunks after it are not placed", i, got, want)
                return i
        return None


def _recheck(gp: GpuPath, key: bytes) -> None:
    """Reads ``key`` once through the daemon's own CRC32C check, which drops a bad arena copy
    (the next lookup then misses it, or a lower tier serves a good one)."""
    c = gp.client
    try:
        r = c._lease_read(local_pb2.LeaseReadRequest(namespace_id=c.namespace_id, keys=[key]), **gp._rpc_meta())
        c._release_later(r.lease_id)
    except Exception as e:  # noqa: BLE001 - the chunk was not placed either way
        log.info("re-reading a chunk that failed its check on the GPU failed: %s", e)


def _decoded(gp: GpuPath, coded, placed: int, dst, contiguous, arena_base: int, verify: bool,
             chk: "_Checks | None", bad: list[int]):
    """Decodes the leased compressed chunks ``coded`` (``(chunk, extent)``) straight into the
    engine layout (``_load_coded``): with ``chk`` (the client checks what it reads) only the
    leading run whose bitstreams landed with their stored CRC32C; ``verify``: headers and layer
    CRCs checked on the host first. Returns ``(placed, [], stop)``, ``stop`` when one failed its
    check (recorded in ``bad``; the chunks before it are placed); raises CodecError when the
    first of them, proven, does not decode (the writer stored garbage)."""
    from kvstore_native.codec import CodecError

    r = _load_coded(gp, [arena_base + ext.offset for _, ext in coded], [int(ext.length) for _, ext in coded],
                    [int(ext.crc32c) for _, ext in coded] if chk is not None else None, [i for i, _ in coded], dst,
                    contiguous, gp.kernel_stream, verify_host=verify)
    if r.proven < len(coded):
        log.warning("chunk %d of a GPU load failed its CRC32C check (a compressed bitstream); it and the "
                    "chunks after it are not placed", coded[r.proven][0])
    if r.failed is not None and r.failed < r.proven and r.failed == 0:
        raise CodecError(r.error)
    done = r.placed
    if done < len(coded):
        bad.append(coded[done][0])
        return placed + done, [], True
    return placed + done, [], False
