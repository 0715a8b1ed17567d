"""GPU codec: the ``kvs_cuda_codec_*`` functions of ``libkvstore_cuda.so`` (include/kvstore.h).

Tensors are torch CUDA tensors or CuPy arrays (anything with ``data_ptr()`` or
``.data.ptr``); the stream defaults to the current torch (or CuPy) stream. Lossy levels only;
the bytes are identical to the CPU encoder's, and each side decodes the other's output.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Sequence

from kvstore_native import _lib
from kvstore_native.codec import native
from kvstore_native.codec.errors import CodecError
from kvstore_native.codec.format import LANES, CodecLevel, DType, Layout, parse_header

CUDA_LIB_ENV = _lib.CUDA_ENV
_DTYPES = {"float16": DType.FLOAT16, "bfloat16": DType.BFLOAT16, "float32": DType.FLOAT32}


def lib() -> ctypes.CDLL:
    """``libkvstore_cuda.so`` (raises ``NativeLibraryMissing``, an ImportError, where it was not built)."""
    return _lib.cuda()


def _ptr(t) -> int:
    if hasattr(t, "data_ptr"):
        return int(t.data_ptr())
    return int(t.data.ptr)


def _dtype(t) -> DType:
    name = str(t.dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise CodecError(f"unsupported dtype {t.dtype}")
    return _DTYPES[name]


def _nbytes(t) -> int:
    if hasattr(t, "element_size"):
        return t.numel() * t.element_size()
    return int(t.nbytes)


def _contiguous(t) -> bool:
    return t.is_contiguous() if hasattr(t, "is_contiguous") else bool(t.flags.c_contiguous)


def _stream(t, stream) -> int:
    if stream is not None:
        return int(getattr(stream, "cuda_stream", getattr(stream, "ptr", stream)))
    if hasattr(t, "data_ptr"):
        import torch

        return int(torch.cuda.current_stream(t.device).cuda_stream)
    import cupy

    return int(cupy.cuda.get_current_stream().ptr)


def encode(t, level: CodecLevel = CodecLevel.DEFAULT, layout: Layout = Layout.KV, *, stream=None,
           lanes: int = LANES) -> bytes:
    """Encode a device-resident chunk on the GPU; returns the bitstream (host bytes), through the
    batched encoder (:func:`encode_batch`: 1.8 -> 7-8.6 GB/s for one SmolLM2 chunk on an H100)."""
    from kvstore_native.codec import _shape_args, check_lanes

    level, layout = CodecLevel(level), Layout(layout)
    if not _contiguous(t):
        raise CodecError("tensor must be contiguous")
    check_lanes(lanes, level)
    if level != CodecLevel.LOSSLESS:
        return encode_batch([t], level, layout, stream=stream, lanes=lanes)[0]
    L, T, H, D = _shape_args(tuple(t.shape), layout)
    dt = _dtype(t)
    cap = native.lib().kvs_codec_encode_bound(dt, layout, L, T, H, D, level)
    out = ctypes.create_string_buffer(cap)
    size = ctypes.c_uint64(0)
    err = native.err_buf()
    code = lib().kvs_cuda_codec_encode(_ptr(t), dt, layout, L, T, H, D, level, _stream(t, stream), out, cap,
                                 ctypes.byref(size), err, native.ERR_CAP)
    if code == native.E_BUFFER and size.value > cap:  # bound was too small: retry at the exact size
        cap = size.value
        out = ctypes.create_string_buffer(cap)
        code = lib().kvs_cuda_codec_encode(_ptr(t), dt, layout, L, T, H, D, level, _stream(t, stream), out, cap,
                                     ctypes.byref(size), err, native.ERR_CAP)
    native.check(code, err)
    return out.raw[: size.value]


def decode_into(data: bytes, out, *, device_data=None, stream=None, verify: bool = True):
    """Decode ``data`` on the GPU into the device tensor ``out`` (contiguous, chunk shape/dtype).

    ``device_data``: the same bitstream already on the device (a uint8 tensor/array); when
    omitted it is uploaded here. ``data`` (host) is used to validate header, index and CRCs.
    """
    data = bytes(data)
    h = parse_header(data) if len(data) >= 64 else None
    if h is not None and tuple(out.shape) != h.shape:
        raise CodecError(f"output shape {tuple(out.shape)} != chunk shape {h.shape}")
    if not _contiguous(out):
        raise CodecError("output must be contiguous")
    if device_data is None:
        import torch

        device_data = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(out.device if hasattr(out, "device") else "cuda")
    err = native.err_buf()
    native.check(lib().kvs_cuda_codec_decode(data, len(data), _ptr(device_data), len(data), _ptr(out), _nbytes(out),
                                       _stream(out, stream), int(verify), err, native.ERR_CAP), err)
    return out


def decode_batch(datas: list[bytes], outs: list, *, device_datas: list | None = None, stream=None,
                 verify: bool = True) -> list:
    """Decode chunks of one shape and dtype in one kernel launch (more lanes in flight).

    ``device_datas[i]`` is ``datas[i]`` already on the device (uploaded here when omitted).
    """
    if len(datas) != len(outs) or not datas:
        raise CodecError("datas and outs must be non-empty lists of equal length")
    datas = [bytes(d) for d in datas]
    if device_datas is None:
        import torch

        device_datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8).to(outs[0].device) for d in datas]
    n = len(datas)
    keep = [ctypes.c_char_p(d) for d in datas]
    heads = (ctypes.c_void_p * n)(*[ctypes.cast(k, ctypes.c_void_p).value for k in keep])
    lens = (ctypes.c_uint64 * n)(*[len(d) for d in datas])
    bufs = (ctypes.c_void_p * n)(*[_ptr(d) for d in device_datas])
    dsts = (ctypes.c_void_p * n)(*[_ptr(o) for o in outs])
    nb = _nbytes(outs[0])
    if any(_nbytes(o) != nb or not _contiguous(o) for o in outs):
        raise CodecError("outputs must be contiguous and of one size")
    err = native.err_buf()
    native.check(lib().kvs_cuda_codec_decode_batch(n, heads, lens, bufs, lens, dsts, nb, _stream(outs[0], stream),
                                             int(verify), err, native.ERR_CAP), err)
    return outs


def decode_batch_ptrs(host_ptrs: list[int], dev_ptrs: list[int], lens: list[int], dst_ptrs: list[int],
                      dst_bytes_each: int, stream: int, verify: bool = False,
                      host_lens: list[int] | None = None) -> None:
    """Pointer form of :func:`decode_batch` for the data path: ``host_ptrs[i]`` is the bitstream in
    host memory (e.g. the shared arena; only its header and index are read unless ``verify``),
    ``dev_ptrs[i]`` the same bytes on the device, ``dst_ptrs[i]`` its decoded chunk's device
    buffer of ``dst_bytes_each`` bytes. One kernel launch on ``stream``; returns after the stream
    synchronized (the kernel's error word is read back). ``host_lens``: bytes at each host
    pointer when it holds only a copy of the bitstream's header and index (at least
    ``64 + 16 * layers`` bytes; ``verify`` then checks nothing on the host)."""
    n = len(host_ptrs)
    if not n or not (n == len(dev_ptrs) == len(lens) == len(dst_ptrs)):
        raise CodecError("host_ptrs, dev_ptrs, lens and dst_ptrs must be non-empty and of one length")
    # The host pointers hold the whole bitstreams: without ``verify`` only their headers and
    # indexes are read (validated on the host); with it the layer CRCs are checked on the CPU.
    host_lens = list(lens) if host_lens is None else list(host_lens)
    if len(host_lens) != n:
        raise CodecError("host_lens must have one entry per bitstream")
    arr = lambda t, v: (t * n)(*v)  # noqa: E731
    err = native.err_buf()
    native.check(lib().kvs_cuda_codec_decode_batch(n, arr(ctypes.c_void_p, host_ptrs), arr(ctypes.c_uint64, host_lens),
                                                   arr(ctypes.c_void_p, dev_ptrs), arr(ctypes.c_uint64, lens),
                                                   arr(ctypes.c_void_p, dst_ptrs), dst_bytes_each, stream, int(verify),
                                                   err, native.ERR_CAP), err)


# ---- batched calls (codec_decode.cu, codec_load.cu, codec_encode.cu) -------------------------

#: Decoder variants of :func:`set_decoder` (include/kvstore.h, kvs_cuda_codec_set_decoder).
DECODERS = {"first": 0, "warp-smem": 1, "warp-smem-hw": 2, "warp-global": 3, "warp-global-hw": 4,
            "warp-smem-hw-short": 5}


def set_decoder(name: str = "warp-smem-hw-short", warps_per_block: int = 4) -> None:
    """Process-wide choice of the GPU decoder (tests and benchmarks compare them; every variant
    is bit-exact with the CPU codec; the default is "warp-smem-hw-short")."""
    if name not in DECODERS:
        raise CodecError(f"unknown decoder {name!r} (one of {sorted(DECODERS)})")
    err = native.err_buf()
    native.check(lib().kvs_cuda_codec_set_decoder(DECODERS[name], warps_per_block, err, native.ERR_CAP), err)


#: Statistics passes of the batched encoder (include/kvstore.h, kvs_cuda_codec_set_encoder).
ENCODERS = {"global": 0, "tile": 1}


def set_encoder(name: str = "tile") -> None:
    """Process-wide choice of the batched GPU encoder's statistics pass (tests and benchmarks
    compare them; both give the CPU encoder's bytes): "global" reads the segment from device
    memory pass by pass, "tile" stages it once in shared memory (fp16 / bf16 segments up to
    110 KB; others fall back to "global"; the default)."""
    if name not in ENCODERS:
        raise CodecError(f"unknown encoder {name!r} (one of {sorted(ENCODERS)})")
    err = native.err_buf()
    native.check(lib().kvs_cuda_codec_set_encoder(ENCODERS[name], err, native.ERR_CAP), err)


def selftest_conversions() -> tuple[int, int]:
    """Non-NaN binary32 values where the hardware fp16 / bf16 conversion differs from the format's."""
    a, b = ctypes.c_uint64(0), ctypes.c_uint64(0)
    err = native.err_buf()
    native.check(lib().kvs_cuda_codec_selftest(ctypes.byref(a), ctypes.byref(b), err, native.ERR_CAP), err)
    return a.value, b.value


def load_batch_ptrs(host_ptrs: list[int], lens: list[int], dst_ptrs: list[int], dst_bytes_each: int, stream: int,
                    *, groups: int = 0, verify: bool = False) -> None:
    """Compressed load: bitstreams in host memory (``host_ptrs[i]``, ``lens[i]`` bytes; pinned or
    registered memory for asynchronous copies) cross PCIe in ``groups`` groups and are decoded on
    the GPU into ``dst_ptrs[i]``, group g decoding while g + 1 is in flight. ``verify``: layer
    CRC32Cs checked on the GPU. Returns after ``stream`` synchronized; raises CodecError on
    corrupt input."""
    n = len(host_ptrs)
    if not n or not (n == len(lens) == len(dst_ptrs)):
        raise CodecError("host_ptrs, lens and dst_ptrs must be non-empty and of one length")
    arr = lambda t, v: (t * n)(*v)  # noqa: E731
    err = native.err_buf()
    native.check(lib().kvs_cuda_codec_load_batch(n, arr(ctypes.c_void_p, host_ptrs), arr(ctypes.c_uint64, lens),
                                                 arr(ctypes.c_void_p, dst_ptrs), dst_bytes_each, groups, stream,
                                                 int(verify), err, native.ERR_CAP), err)


@dataclass
class DecodeMap:
    """Where a mapped load (:func:`load_mapped`) writes each decoded element, in device memory:
    element (segment p = layer * S + k, token t, channel c) of chunk i goes to
    ``planes[i, p] + toks[i, t] + (c // run_elems) * run_stride + (c % run_elems) * itemsize``
    (S = 2 for KV, 1 for MLA). ``planes``: uint64 ``[chunks, layers * S]`` device addresses;
    ``toks``: uint64 ``[chunks, tokens]`` byte offsets (e.g. a paged cache's slot times its token
    stride); runs of ``run_elems`` channels (a head) every ``run_stride`` bytes."""

    planes: Any
    toks: Any
    run_elems: int
    run_stride: int


@dataclass
class MappedLoad:
    """What :func:`load_mapped` placed: chunks ``[0, placed)``. ``proven``: the leading chunks
    whose bitstream landed with its stored CRC32C; ``failed``: the first chunk that did not
    decode (or that the host check refused), None if none; ``error``: its message."""

    proven: int
    failed: int | None
    error: str

    @property
    def placed(self) -> int:
        return self.proven if self.failed is None else min(self.proven, self.failed)


def load_mapped(host_ptrs: Sequence[int], lens: Sequence[int], dtype: DType, layout: Layout,
                shape: tuple[int, int, int, int], dst: DecodeMap, stream: int, *,
                want_crcs: Sequence[int] | None = None, groups: int = 0, verify_host: bool = False) -> MappedLoad:
    """Compressed load straight into engine memory (``kvs_cuda_codec_load_mapped``): bitstreams
    in host memory (registered or pinned) cross PCIe in groups, get their CRC32C on the GPU and
    are decoded where ``dst`` says, consecutive groups side by side; chunk i is decoded only if
    the CRC32Cs of chunks 0..i all equal ``want_crcs`` (nothing unproven is written), and each
    header is checked on the device against ``shape`` = ``(layers, tokens, heads, head_dim)``.
    The host reads nothing of the bitstreams unless ``verify_host`` (memory that cannot change
    under the call: headers, indexes and layer CRCs checked there first). Returns after
    ``stream`` synchronized. Raises CodecError for bad arguments; a corrupt chunk is reported in
    the result (``failed``), the chunks before it placed."""
    import numpy as np

    n = len(host_ptrs)
    L, T, H, D = (int(v) for v in shape)
    P = L * (2 if Layout(layout) == Layout.KV else 1)
    planes = np.ascontiguousarray(dst.planes, dtype=np.uint64)
    toks = np.ascontiguousarray(dst.toks, dtype=np.uint64)
    if n == 0 or len(lens) != n or planes.shape != (n, P) or toks.shape != (n, T):
        raise CodecError(f"{n} bitstreams need {n} lengths, planes [{n}, {P}] and token offsets [{n}, {T}] "
                         f"(got {len(lens)}, {list(planes.shape)}, {list(toks.shape)})")
    if want_crcs is not None and len(want_crcs) != n:
        raise CodecError("want_crcs must have one CRC32C per bitstream")
    arr = lambda t, v: (t * n)(*v)  # noqa: E731
    want = arr(ctypes.c_uint32, want_crcs) if want_crcs is not None else None
    proven, failed = ctypes.c_uint32(0), ctypes.c_uint32(0)
    err = native.err_buf()
    rc = lib().kvs_cuda_codec_load_mapped(n, arr(ctypes.c_void_p, host_ptrs), arr(ctypes.c_uint64, lens), want,
                                          int(dtype), int(layout), L, T, H, D, planes.ctypes.data, toks.ctypes.data,
                                          int(dst.run_elems), int(dst.run_stride), groups, stream, int(verify_host),
                                          ctypes.byref(proven), ctypes.byref(failed), err, native.ERR_CAP)
    if rc == _lib.ECORRUPT:
        return MappedLoad(proven.value, failed.value if failed.value < n else None,
                          err.value.decode(errors="replace"))
    native.check(rc, err)
    return MappedLoad(proven.value, None, "")


def load_batch(host_bufs: list, outs: list, *, groups: int = 0, verify: bool = False, stream=None) -> list:
    """:func:`load_batch_ptrs` over host buffers (pinned torch uint8 tensors, numpy arrays or
    bytes) and contiguous device tensors of the chunks' shape and dtype."""
    if len(host_bufs) != len(outs) or not outs:
        raise CodecError("host_bufs and outs must be non-empty lists of equal length")
    nb = _nbytes(outs[0])
    if any(_nbytes(o) != nb or not _contiguous(o) for o in outs):
        raise CodecError("outputs must be contiguous and of one size")
    keep, ptrs, lens = [], [], []
    for b in host_bufs:
        if isinstance(b, (bytes, bytearray, memoryview)):
            raw = bytes(b)
            keep.append(ctypes.c_char_p(raw))  # pageable: the copies are staged, not asynchronous
            ptrs.append(ctypes.cast(keep[-1], ctypes.c_void_p).value)
            lens.append(len(raw))
        elif hasattr(b, "data_ptr"):
            ptrs.append(int(b.data_ptr()))
            lens.append(int(b.numel() * b.element_size()))
        else:
            ptrs.append(int(b.ctypes.data))
            lens.append(int(b.nbytes))
    load_batch_ptrs(ptrs, lens, [_ptr(o) for o in outs], nb, _stream(outs[0], stream), groups=groups, verify=verify)
    return outs


def _batch_shape(srcs: list, layout: Layout):
    """``(dtype, (layers, tokens, heads, head_dim))`` of a batch of contiguous device chunks of
    one shape and dtype (CodecError otherwise)."""
    from kvstore_native.codec import _shape_args

    if not srcs:
        raise CodecError("srcs must be non-empty")
    shape, dt = tuple(srcs[0].shape), _dtype(srcs[0])
    if any(tuple(s.shape) != shape or _dtype(s) != dt or not _contiguous(s) for s in srcs):
        raise CodecError("sources must be contiguous and of one shape and dtype")
    return dt, _shape_args(shape, layout)


def encode_batch_into(srcs: list, level: CodecLevel, out, *, layout: Layout = Layout.KV,
                      stream=None, lanes: int = LANES) -> list[tuple[int, int]]:
    """Encode device chunks of one shape in one batched pass; bitstream i is written to the host
    buffer ``out`` (pinned uint8 tensor or numpy array; :func:`encode_bound_batch` bytes) at the
    returned (offset, size). Bit-exact with the CPU encoder (``codec.encode`` with the same
    ``lanes``). Raises CodecError when ``out`` is too small."""
    from kvstore_native.codec import check_lanes

    level, layout = CodecLevel(level), Layout(layout)
    lanes = check_lanes(lanes, level)
    dt, (L, T, H, D) = _batch_shape(srcs, layout)
    n = len(srcs)
    offs, sizes = (ctypes.c_uint64 * n)(), (ctypes.c_uint64 * n)()
    optr = int(out.data_ptr()) if hasattr(out, "data_ptr") else int(out.ctypes.data)
    cap = _nbytes(out) if hasattr(out, "data_ptr") else int(out.nbytes)
    err = native.err_buf()
    native.check(lib().kvs_cuda_codec_encode_batch(n, (ctypes.c_uint64 * n)(*[_ptr(s) for s in srcs]), dt, layout,
                                                   L, T, H, D, level, lanes, _stream(srcs[0], stream), optr, cap, offs,
                                                   sizes,
                                                   err, native.ERR_CAP), err)
    return [(int(offs[i]), int(sizes[i])) for i in range(n)]


def encode_batch_placed(srcs: list, level: CodecLevel, place, *, layout: Layout = Layout.KV,
                        stream=None, lanes: int = LANES) -> list[tuple[int, int]]:
    """Encode device chunks of one shape in one batched pass, each bitstream written where
    ``place`` says once the sizes are known: ``place(sizes)`` (a list of ints, called while the
    payloads are assembled and checksummed on the GPU) returns one host pointer per chunk with
    that many writable bytes (pinned or CUDA-registered memory for an asynchronous copy; 0
    skips the chunk). Returns ``(size, crc32c)`` per chunk, the CRC32C of the whole bitstream as
    written (computed on the GPU and combined with the header's). An exception raised by
    ``place`` abandons the encode and propagates; nothing is then written anywhere."""
    from kvstore_native.codec import check_lanes

    level, layout = CodecLevel(level), Layout(layout)
    lanes = check_lanes(lanes, level)
    dt, (L, T, H, D) = _batch_shape(srcs, layout)
    n = len(srcs)
    sizes, crcs = (ctypes.c_uint64 * n)(), (ctypes.c_uint32 * n)()
    failure: list[BaseException] = []

    def cb(_ctx, count, sz, dsts) -> int:
        try:
            ptrs = list(place([int(sz[i]) for i in range(count)]))
            if len(ptrs) != count:
                raise CodecError(f"place returned {len(ptrs)} destinations for {count} chunks")
            for i, q in enumerate(ptrs):
                dsts[i] = int(q or 0)
            return 0
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the native call unwinds
            failure.append(e)
            return 1

    fn = _lib.PLACE_FN(cb)
    err = native.err_buf()
    rc = lib().kvs_cuda_codec_encode_batch_placed(n, (ctypes.c_uint64 * n)(*[_ptr(s) for s in srcs]), dt, layout,
                                                  L, T, H, D, level, lanes, _stream(srcs[0], stream), fn, None, sizes,
                                                  crcs,
                                                  err, native.ERR_CAP)
    if failure:
        raise failure[0]
    native.check(rc, err)
    return [(int(sizes[i]), int(crcs[i])) for i in range(n)]


def encode_bound_batch(src, count: int, level: CodecLevel, layout: Layout = Layout.KV) -> int:
    """Host bytes :func:`encode_batch_into` may need for ``count`` chunks shaped like ``src``."""
    from kvstore_native.codec import _shape_args

    L, T, H, D = _shape_args(tuple(src.shape), Layout(layout))
    one = native.lib().kvs_codec_encode_bound(_dtype(src), Layout(layout), L, T, H, D, CodecLevel(level))
    return count * ((one + 15) // 16 * 16)


def encode_batch(srcs: list, level: CodecLevel = CodecLevel.DEFAULT, layout: Layout = Layout.KV, *,
                 stream=None, lanes: int = LANES) -> list[bytes]:
    """:func:`encode_batch_into` returning one ``bytes`` per chunk (copies out of a host buffer)."""
    import numpy as np

    out = np.empty(encode_bound_batch(srcs[0], len(srcs), level, layout), dtype=np.uint8)
    spans = encode_batch_into(srcs, level, out, layout=layout, stream=stream, lanes=lanes)
    return [out[o:o + s].tobytes() for o, s in spans]
