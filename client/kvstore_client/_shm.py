"""Same-host plans: attach to the daemon's arena, lease / reserve / commit, restart detection.

Each function takes the ``ClientCore`` and is a plan (see ``_steps``). Bytes move by memory
copies between the mapped arena and the caller's buffers (``Work`` steps); gRPC carries only
descriptors (offsets, lengths, lease ids). A lease is always ended: on success and on error,
through ``core.release_later`` (and it expires on the daemon after ``server.lease_ttl_s``
if the Release never arrives).

The native library is optional here: without ``kvstore_native.transfer`` a CUDA tensor
moves through torch copies instead of the gather/scatter kernels.
"""

from __future__ import annotations

import grpc
import numpy as np

from kvstore_wire import crc as _crc
from kvstore_wire._proto.kvstore.v1 import local_pb2
from kvstore_wire.presence import PresenceReader
from kvstore_wire.types import Durability, Encoding, KeyKind

from . import _common as C
from ._control import close_control, open_control
from ._steps import Call, Work
from .errors import is_exhausted
from .local import SharedArena

try:  # optional: CUDA gather/scatter kernels
    from kvstore_native import transfer
except ImportError:
    transfer = None


def _kernels_usable() -> bool:
    return transfer is not None and transfer.cuda_available()


def attach(core):
    """Maps the daemon's arena and presence index when this process can see them; leaves
    both None otherwise (another host, a token without the same-host right, no shm)."""
    try:
        a = yield Call("attach", local_pb2.AttachRequest())
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED,
                        grpc.StatusCode.PERMISSION_DENIED):  # no local_path right: the stream path
            # An earlier daemon's mappings go with their last reader (they hold its tmpfs pages).
            core.arena, core.nonce, core.presence, core.hbm = None, b"", None, None
            core.unbound_reservations = False
            yield Work(close_control, (core,))
            return
        raise
    arena = SharedArena.open(a.arena_path, a.arena_bytes, a.nonce, a.nonce_offset)
    core.arena = arena
    core.nonce = a.nonce if arena is not None else b""
    core.hbm = a.hbm if arena is not None and a.HasField("hbm") else None   # the daemon's HBM pool
    core.lease_ttl_s = float(a.lease_ttl_s or core.lease_ttl_s)
    core.unbound_reservations = arena is not None and a.unbound_reservations   # write-ahead for GPU stores
    if core.gpu is not None:
        core.gpu.reattached()
    core.presence = PresenceReader.open(a.index_path, a.nonce) if arena is not None and a.index_path else None
    yield Work(open_control, (core, a))    # the hot calls without gRPC (or None: all over gRPC)


def detach(core) -> None:
    close_control(core)
    if core.arena is not None:
        core.arena.close()
        core.arena = None
    if core.presence is not None:
        core.presence.close()
        core.presence = None
    core.nonce = b""
    core.hbm = None
    core.unbound_reservations = False


def reattach(core):
    """The daemon restarted (new arena): map the new arena and index, then drop the old
    mappings; the stream path is used if mapping is no longer possible. Another thread of a
    shared client never sees the mappings missing in between: it reads either the old ones
    (whose offsets its nonce check then rejects) or the new ones. The old mappings are not
    closed here, since another thread may be reading through them right now: they are
    unmapped when the last reference goes. An arena pinned for CUDA is the exception (the
    GPU path, serialised by its own lock, unregisters it first)."""
    old_arena = core.arena
    yield from attach(core)
    if old_arena is not None and old_arena is not core.arena and old_arena.cuda_registered:
        old_arena.close()


def same_arena(core, nonce: bytes):
    """Whether offsets from a response with this arena nonce are valid in our mapping;
    re-attaches when the daemon restarted since we mapped it."""
    if nonce == core.nonce:
        return True
    yield from reattach(core)
    return core.arena is not None and nonce == core.nonce


def store_local(core, u8, keys: list[bytes], chunks: list[int], durability: Durability, num_tokens: int | None = None):
    """Same-host store: reserve arena extents, copy each chunk straight into its extent
    (the only copy), commit; the daemon's DRAM tier takes the extents over. Returns
    ``(stored, done, unsure)``: the chunks newly stored this way; False when the caller should
    stream the rest instead (what is not stored yet: its Exists check); and the chunks of a
    commit the daemon refused part way (it may have published some before the refusal: those
    the Exists check then finds were stored by this call). Done is False when the arena can no
    longer be mapped, or the daemon refused the reservation of a single chunk or a commit with
    RESOURCE_EXHAUSTED (the tenant's reserved-bytes or DRAM quota, or no arena room: the
    stream path queues on the in-flight budget and may land the chunks in a lower tier). A
    refused reservation of several chunks is asked for again in halves, one after the other.
    ``num_tokens``: of every chunk (default a full chunk; a trailing partial chunk is stored
    alone, as chunk 0 of a ``u8`` holding just its tokens)."""
    ns = core.namespace
    num_tokens = num_tokens or ns.chunk_tokens
    size = ns.chunk_bytes(num_tokens)
    req = local_pb2.ReserveWriteRequest(namespace_id=core.namespace_id, chunks=[
        local_pb2.ChunkToWrite(key=k, key_kind=KeyKind.PREFIX, num_tokens=num_tokens, encoding=Encoding.RAW,
                               payload_bytes=size) for k in keys])
    try:
        resp = yield Call("reserve", req)
    except grpc.RpcError as e:
        if not is_exhausted(e):
            raise
        if len(keys) == 1:
            return 0, False, []
        # More than the tenant may hold reserved at once: the halves one after the other (each
        # committed, so its reservation ended, before the next is asked for).
        half = len(keys) // 2
        first, done, unsure = yield from store_local(core, u8, keys[:half], chunks[:half], durability, num_tokens)
        if not done:
            return first, False, unsure
        rest, done, unsure = yield from store_local(core, u8, keys[half:], chunks[half:], durability, num_tokens)
        return first + rest, done, unsure
    if resp.lease_id == 0:
        return 0, True, []
    if not (yield from same_arena(core, resp.arena_nonce)):
        core.release_later(resp.lease_id)
        return 0, False, []
    targets = [(chunks[s.index], core.arena.view(s.offset, s.length)) for s in resp.slots if not s.exists]
    stream = None
    if C.is_cuda_tensor(u8):
        import torch

        stream = torch.cuda.current_stream(u8.device)   # the caller's stream, captured on its thread
    try:
        crcs = yield Work(_copy_into_arena, (core, u8, targets, stream))
    except BaseException:
        core.release_later(resp.lease_id)
        raise
    # The daemon publishes an extent only if its CRC32C matches what we say we wrote
    # (docs/security.md, "Stale bytes"): one per slot that was not `exists`, in slot order.
    try:
        done = yield Call("commit", local_pb2.CommitWriteRequest(lease_id=resp.lease_id, durability=int(durability),
                                                                 crc32c=crcs))
    except grpc.RpcError as e:
        if is_exhausted(e):   # over the tenant's DRAM quota: nothing left reserved on the daemon
            return 0, False, [i for i, _ in targets]
        raise
    return done.stored, True, []


def _copy_into_arena(core, u8, targets: list[tuple[int, object]], stream) -> list[int]:
    """Chunk ``i`` of ``u8`` into each ``(i, extent)``: one gather kernel per chunk from a
    contiguous CUDA tensor into the CUDA-registered arena, else a host copy. Returns the
    CRC32C of each extent as written, so it covers what the daemon will publish. From host
    memory each chunk is copied and checksummed in one pass (``_copy_chunk_crc``), chunks in
    parallel on the client's copy threads."""
    ns = core.namespace
    if stream is None:
        pool = core.copy_pool()
        one = lambda t: _copy_chunk_crc(u8, ns, t[0], t[1])  # noqa: E731
        return list(pool.map(one, targets)) if pool is not None and len(targets) > 1 else [one(t) for t in targets]
    kernel = u8.is_contiguous() and _kernels_usable() and core.arena.register_cuda()
    if kernel:
        planes, heads, elt = C.planes_of(u8, ns)
    for index, dst in targets:
        if kernel:
            start = index * ns.chunk_tokens
            end = min(start + ns.chunk_tokens, C.token_count(u8, ns))    # a trailing partial chunk ends early
            spec = transfer.PlaneSpec(planes, list(range(start, end)), heads,
                                      ns.head_dim * elt, heads * ns.head_dim * elt, ns.head_dim * elt)
            transfer.gather(spec, int(dst.ctypes.data), device=True, stream=stream.cuda_stream)
        else:
            C.copy_chunk_out(u8, ns, index, dst, stream)
    stream.synchronize()   # bytes in the arena before commit
    return [_crc.crc32c(dst) for _, dst in targets]


def _copy_chunk_crc(u8, ns, index: int, dst) -> int:
    """Host chunk ``index`` of ``u8`` into the extent ``dst``; returns the CRC32C of the extent
    as written. Native: each row is copied and checksummed block by block while cache-hot
    (the bytes cross memory once); else a copy, then a CRC pass over the extent."""
    part = u8[C.token_slice(u8.ndim, ns, index)]
    rows = int(np.prod(part.shape[:C.token_axis(ns)]))
    dst2, src2 = dst.reshape(rows, -1), part.reshape(rows, -1)   # views: each row is contiguous
    if _crc.native_copy_rows_crc32c is not None and src2.strides[1] == 1 and dst2.strides[1] == 1:
        return _crc.native_copy_rows_crc32c(dst2, src2)
    C.copy_chunk_out(u8, ns, index, dst)
    return _crc.crc32c(dst)


def retrieve_local(core, keys: list[bytes], asm: "C.ChunkAssembler"):
    """Lease the chunks, copy each from the mapped arena into place, release. Leaves
    ``asm.matched`` short of ``len(keys)`` where the arena did not hold the rest."""
    resp = yield Call("lease_read", local_pb2.LeaseReadRequest(namespace_id=core.namespace_id, keys=keys))
    try:
        usable = yield from same_arena(core, resp.arena_nonce)
        items = []
        for ext in resp.extents if usable else ():
            if not ext.found or ext.index != asm.matched + len(items):
                break
            items.append((core.arena.view(ext.offset, ext.length), ext.num_tokens, Encoding(ext.encoding),
                          ext.crc32c))
        yield Work(asm.place_many, (items, core.copy_pool()))
    finally:
        core.release_later(resp.lease_id)


def check_cuda_out(core, keys: list[bytes], out) -> None:
    """InvalidArgument unless ``out`` is a contiguous tensor of the namespace's dtype holding
    exactly ``keys``' chunks (``retrieve_into``'s contract, on every CUDA path)."""
    ns = core.namespace
    if out.dtype != C.torch_dtype(ns.dtype) or not out.is_contiguous() or \
            tuple(out.shape) != ns.chunk_shape(len(keys) * ns.chunk_tokens):
        raise C.InvalidArgument(f"out must be a contiguous {ns.dtype.name} tensor of shape "
                                f"{list(ns.chunk_shape(len(keys) * ns.chunk_tokens))}")


def retrieve_cuda(core, keys: list[bytes], out):
    """Into a CUDA tensor: from leased arena extents (registered with CUDA) by the scatter
    kernel, one host->device pass; without the shared path or the kernels, through a pinned
    host buffer. Returns the matched chunk count."""
    import torch

    check_cuda_out(core, keys, out)
    if core.arena is None or not _kernels_usable() or not core.arena.register_cuda():
        return (yield from _retrieve_via_host(core, keys, out))
    resp = yield Call("lease_read", local_pb2.LeaseReadRequest(namespace_id=core.namespace_id, keys=keys))
    try:
        if not (yield from same_arena(core, resp.arena_nonce)) or not core.arena.register_cuda():
            return (yield from _retrieve_via_host(core, keys, out))
        stream = torch.cuda.current_stream(out.device)
        return (yield Work(_scatter_from_arena, (core, resp.extents, out, stream)))
    finally:
        core.release_later(resp.lease_id)


def _scatter_from_arena(core, extents, out, stream) -> int:
    ns = core.namespace
    planes, heads, elt = C.planes_of(out, ns)
    n = 0
    for ext in extents:
        if not ext.found or ext.index != n:
            break
        src = core.arena.view(ext.offset, ext.length)
        if ext.encoding != Encoding.RAW:
            import torch

            raw = torch.from_numpy(C.decode_chunk(src)).view(out.dtype).view(ns.chunk_shape())
            with torch.cuda.stream(stream):
                out[C.token_slice(out.dim(), ns, n)].copy_(raw)
        else:
            start = n * ns.chunk_tokens
            spec = transfer.PlaneSpec(planes, list(range(start, start + ns.chunk_tokens)),
                                      heads, ns.head_dim * elt, heads * ns.head_dim * elt, ns.head_dim * elt)
            transfer.scatter(int(src.ctypes.data), spec, device=True, stream=stream.cuda_stream)
        n += 1
    stream.synchronize()  # the extents are read before the lease ends
    return n


def _retrieve_via_host(core, keys: list[bytes], out):
    """Into a CUDA tensor through a pinned host buffer (no usable shared arena or kernels)."""
    import torch

    host = torch.empty(out.shape, dtype=out.dtype).pin_memory()
    asm = yield from core.fetch(keys, None, host)
    yield Work(_copy_to_device, (out, host))
    return asm.matched


def _copy_to_device(out, host) -> None:
    out.copy_(host)
