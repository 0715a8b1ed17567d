"""Tensor <-> chunk bytes, request building, results and the Get assembler, for ``_core``.

Tensors are handled as numpy ``uint8`` arrays whose last axis is ``head_dim * itemsize``
bytes, so every KV dtype (including bfloat16 and fp8, which numpy lacks) takes the same path.
torch is imported only when a tensor is passed in or asked for.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from kvstore_wire import crc as _crc
from kvstore_wire._proto.kvstore.v1 import common_pb2, data_pb2
from kvstore_wire.framing import encode_data
from kvstore_wire.keys import Namespace
from kvstore_wire.types import DType, Durability, Encoding, KeyKind, Layout, Tier

from .errors import DataLoss, InvalidArgument, KVStoreClientError

# CRC32C always goes through ``kvstore_wire.crc`` (native, a small wheel, or pure Python:
# ``crc.BACKEND`` says which); verification is never switched off for want of a fast one.
native_copy_rows = _crc.native_copy_rows

#: Default size of the data pieces a Put sends (the daemon tells the largest message it accepts).
DEFAULT_PIECE_BYTES = 1024 * 1024
#: Room left for the message framing below the daemon's message limit.
FRAMING_SLACK_BYTES = 4096

_NUMPY_DTYPES = {DType.FLOAT16: ("float16",), DType.FLOAT32: ("float32",),
                 DType.BFLOAT16: ("bfloat16", "uint16", "int16"), DType.FLOAT8_E4M3: ("float8_e4m3fn", "uint8", "int8")}
_NUMPY_OUT = {DType.FLOAT16: np.float16, DType.FLOAT32: np.float32, DType.BFLOAT16: np.uint16,
              DType.FLOAT8_E4M3: np.uint8}


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The longest stored prefix: whole chunks only, with the tier of each matched chunk."""
    matched_tokens: int
    matched_chunks: int
    tiers: tuple[Tier, ...]


def lookup_from_presence(presence, namespace_id: bytes, keys: Sequence[bytes], chunk_tokens: int) -> LookupResult | None:
    """A prefix lookup answered from the daemon's presence index; None when the index cannot
    tell for some key (an overflowed bucket), or a key is absent but the daemon can fill
    misses from a tier outside the index (its remote tier), and the daemon must be asked."""
    from kvstore_wire.presence import fastest

    tiers = []
    for k in keys:
        mask = presence.probe(namespace_id, k)
        if mask is None:
            return None
        if not mask:
            if getattr(presence, "miss_asks_daemon", False):
                return None   # the daemon may fill the rest (its remote tier): ask it
            break
        tiers.append(fastest(mask))
    return LookupResult(len(tiers) * chunk_tokens, len(tiers), tuple(tiers))


@dataclass(frozen=True, slots=True)
class Registration:
    namespace: Namespace      # with the tenant the daemon took from the credential
    namespace_id: bytes
    piece_bytes: int          # data piece size for Put streams, below the daemon's message limit


def registration(ns: Namespace, resp: data_pb2.RegisterNamespaceResponse) -> Registration:
    """Checks a RegisterNamespace answer against the key spec and derives the session settings."""
    info = resp.namespace
    full = replace(ns, tenant=info.tenant)
    if full.namespace_id != bytes(info.namespace_id):
        raise KVStoreClientError("the daemon's namespace id differs from the one computed from docs/keys.md: "
                                 "client and daemon disagree on the key spec version")
    piece = min(DEFAULT_PIECE_BYTES, max(1, resp.max_message_bytes - FRAMING_SLACK_BYTES))
    return Registration(full, bytes(info.namespace_id), piece)


def as_namespace(ns: Namespace | Mapping[str, Any]) -> Namespace:
    if isinstance(ns, Namespace):
        return ns
    if isinstance(ns, Mapping):
        try:
            return Namespace(**ns)
        except TypeError as e:
            raise InvalidArgument(f"namespace dict: {e}") from None
    raise TypeError("namespace must be a kvstore_client.Namespace or a dict of its fields")


def spec_of(ns: Namespace) -> common_pb2.NamespaceSpec:
    return common_pb2.NamespaceSpec(model=ns.model, dtype=int(ns.dtype), num_layers=ns.num_layers,
                                    num_kv_heads=ns.num_kv_heads, head_dim=ns.head_dim, layout=int(ns.layout),
                                    tp_rank=ns.tp_rank, tp_size=ns.tp_size, chunk_tokens=ns.chunk_tokens)


def token_axis(ns: Namespace) -> int:
    return 1 if ns.layout == Layout.MLA_LATENT else 2


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and "torch" in sys.modules


def torch_dtype(dtype: DType):
    import torch

    return {DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16, DType.FLOAT32: torch.float32,
            DType.FLOAT8_E4M3: getattr(torch, "float8_e4m3fn", None)}[dtype]


def planes_of(t, ns: Namespace) -> tuple[list[int], int, int]:
    """(plane base pointers, heads, element size) of a contiguous tensor in the namespace
    layout, for the gather/scatter kernels: planes are the [layer, K|V] (or MLA layer) slabs."""
    if ns.layout == Layout.MLA_LATENT:
        return [p.data_ptr() for p in t], 1, t.element_size()
    flat = t.reshape(-1, *t.shape[2:])
    return [p.data_ptr() for p in flat], ns.num_kv_heads, t.element_size()


def is_cuda_tensor(x) -> bool:
    return _is_torch(x) and x.device.type == "cuda"


def kv_bytes_array(kv, ns: Namespace, keep_device: bool = False):
    """``kv`` (numpy array or torch tensor in the namespace layout) as a uint8 array whose
    last axis holds ``head_dim * itemsize`` bytes. Checks dtype and every axis but tokens.
    ``keep_device``: a CUDA tensor is checked and returned as it is (no host copy)."""
    if _is_torch(kv):
        import torch

        want = torch_dtype(ns.dtype)
        if kv.dtype != want:
            raise InvalidArgument(f"kv tensor has dtype {kv.dtype}, the namespace stores {ns.dtype.name} ({want})")
        t = kv.detach()
        shape = tuple(t.shape)
        if keep_device and t.device.type == "cuda":
            u8 = t
        else:
            if t.device.type != "cpu":
                t = t.cpu()
            u8 = t.contiguous().view(torch.uint8).numpy()
    else:
        arr = np.asarray(kv)
        if arr.dtype.name not in _NUMPY_DTYPES[ns.dtype]:
            raise InvalidArgument(f"kv array has dtype {arr.dtype}, the namespace stores {ns.dtype.name}: "
                                  f"pass one of {_NUMPY_DTYPES[ns.dtype]}")
        shape = arr.shape
        u8 = np.ascontiguousarray(arr).view(np.uint8)
    expect = ns.chunk_shape(0)
    ax = token_axis(ns)
    if len(shape) != len(expect) or any(s != e for i, (s, e) in enumerate(zip(shape, expect)) if i != ax):
        names = "[layers, tokens, head_dim]" if ax == 1 else "[layers, 2, tokens, kv_heads, head_dim]"
        shown = list(expect)
        shown[ax] = "tokens"
        raise InvalidArgument(f"kv has shape {list(shape)}; this namespace needs {names} = {shown}")
    return u8


def token_count(kv, ns: Namespace) -> int:
    """Tokens ``kv`` holds along the namespace layout's token axis."""
    return int(kv.shape[token_axis(ns)])


def token_range(kv, ns: Namespace, lo: int, hi: int):
    """Tokens ``[lo, hi)`` of ``kv`` (numpy array or torch tensor in the namespace layout) as a
    contiguous array or tensor of the same kind, dtype and device (a copy)."""
    part = kv[token_slice_of(kv.ndim, ns, lo, hi)]
    return part.contiguous() if _is_torch(part) else np.ascontiguousarray(part)


def put_payloads(u8: np.ndarray, ns: Namespace, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
    """(contiguous bytes, CRC32C) of each chunk in ``indices`` (a trailing partial chunk is
    cut at the end of ``u8``; memory work: the async client runs it on a worker thread)."""
    out = []
    for i in indices:
        payload = np.ascontiguousarray(u8[token_slice(u8.ndim, ns, i)]).reshape(-1)
        out.append((payload, _crc.crc32c(payload)))
    return out


def token_slice(ndim: int, ns: Namespace, index: int) -> tuple:
    """Chunk ``index``'s tokens (clamped by indexing at the end of the array)."""
    return token_slice_of(ndim, ns, index * ns.chunk_tokens, (index + 1) * ns.chunk_tokens)


def token_slice_of(ndim: int, ns: Namespace, lo: int, hi: int) -> tuple:
    sl = [slice(None)] * ndim
    sl[token_axis(ns)] = slice(lo, hi)
    return tuple(sl)


def copy_chunk_out(src, ns: Namespace, index: int, dst: np.ndarray, stream=None) -> None:
    """Writes chunk ``index`` of ``src`` contiguously into the host buffer ``dst``: ``src`` is
    a uint8 array from ``kv_bytes_array`` or a CUDA tensor, whose device-to-host copy is
    queued on ``stream`` (the caller synchronises; ``dst`` should be pinned or registered
    memory for full PCIe speed)."""
    part = src[token_slice(src.ndim, ns, index)]
    if is_cuda_tensor(src):
        import torch

        with torch.cuda.stream(stream):
            torch.from_numpy(dst).view(src.dtype).view(part.shape).copy_(part, non_blocking=True)
        return
    rows = int(np.prod(part.shape[:token_axis(ns)]))
    dst2, src2 = dst.reshape(rows, -1), part.reshape(rows, -1)   # views: each row is contiguous
    if native_copy_rows is not None and src2.strides[1] == 1:
        native_copy_rows(dst2, src2)
    else:
        np.copyto(dst2, src2)


def put_messages(namespace_id: bytes, keys: Sequence[bytes], payloads: Sequence[tuple[np.ndarray, int]],
                 ns: Namespace, durability: Durability, piece_bytes: int, num_tokens: int | None = None):
    """Serialised Put stream: for each ``(payload, crc)`` of ``put_payloads`` a header then
    data pieces (generated lazily). ``num_tokens``: of every chunk (default a full chunk)."""
    for key, (payload, crc) in zip(keys, payloads):
        view = memoryview(payload).cast("B")
        header = data_pb2.PutChunkHeader(
            namespace_id=namespace_id, key=key, key_kind=KeyKind.PREFIX, num_tokens=num_tokens or ns.chunk_tokens,
            encoding=Encoding.RAW, payload_bytes=view.nbytes, crc32c=crc, durability=int(durability))
        yield data_pb2.PutRequest(header=header).SerializeToString()
        for off in range(0, view.nbytes, piece_bytes):
            yield encode_data(view[off:off + piece_bytes])


def codec_available() -> bool:
    """True when this process can decode codec bitstreams (the optional ``kvstore-native``
    library is installed and built); the client then accepts chunks as stored, else asks
    the daemon for RAW (daemon-side decode)."""
    try:
        from kvstore_native import codec  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no codec here
        return False
    return True


#: Offset of the level byte in a codec bitstream's header (docs/bitstream.md); 0 is lossless.
CODEC_LEVEL_OFFSET = 9


def is_lossy(bits) -> bool:
    """Whether a codec bitstream was coded with a lossy level (its KV is not the exact bytes)."""
    return len(bits) > CODEC_LEVEL_OFFSET and int(bits[CODEC_LEVEL_OFFSET]) != 0


def decode_chunk(bits) -> np.ndarray:
    """A codec bitstream as the uint8 bytes of the RAW chunk."""
    try:
        from kvstore_native import codec
    except Exception as e:  # noqa: BLE001
        raise DataLoss(f"received a codec bitstream but cannot decode it here ({e}); install "
                       "kvstore-client[native]") from None
    try:
        return codec.decode(bytes(bits)).view(np.uint8).reshape(-1)
    except codec.CodecError as e:
        raise DataLoss(f"the daemon sent a bitstream that does not decode: {e}") from None


class ChunkAssembler:
    """Receives a Get stream straight into the final ``[.., tokens, ..]`` array (no
    reassembly copy); stops at the first missing chunk.

    A chunk's bytes are ``rows`` runs of ``tokens * token_run`` bytes (rows = the axes before
    the token axis, token_run = one token's bytes of the axes after); chunk ``i`` owns columns
    ``[i*run, i*run + its tokens * token_run)`` of the output viewed as ``[rows, columns]``
    (``run`` = a full chunk's). Every chunk is full except, with ``last_tokens``, the last
    key's: a trailing partial chunk of that many tokens.
    """

    def __init__(self, ns: Namespace, n_keys: int, verify_crc: bool | None, out=None, last_tokens: int = 0) -> None:
        self.ns = ns
        self.chunk_bytes = ns.chunk_bytes()
        self.n_keys = n_keys
        self.last_tokens = last_tokens or ns.chunk_tokens
        if not 0 < self.last_tokens <= ns.chunk_tokens:
            raise InvalidArgument(f"last_tokens={last_tokens}: a trailing chunk holds 1..{ns.chunk_tokens} tokens")
        shape = list(ns.chunk_shape())
        ax = token_axis(ns)
        self.rows = int(np.prod(shape[:ax]))
        self.run = self.chunk_bytes // self.rows
        self.token_run = self.run // ns.chunk_tokens
        self.total_tokens = max(0, n_keys - 1) * ns.chunk_tokens + (self.last_tokens if n_keys else 0)
        if out is None:
            self.out = np.empty((self.rows, self.total_tokens * self.token_run), np.uint8)
        else:
            # The caller's buffer (namespace layout, the keys' tokens), written in place.
            u8 = kv_bytes_array(out, ns)
            if u8.shape[ax] != self.total_tokens or not u8.flags.c_contiguous:
                raise InvalidArgument(f"out must be a contiguous array of {self.total_tokens} tokens in "
                                      "the namespace layout")
            self.out = u8.reshape(self.rows, self.total_tokens * self.token_run)
        self.matched = 0
        self.verify = True if verify_crc is None else verify_crc
        self._off = 0          # bytes of the current chunk received
        self._expect = 0       # bytes of the current chunk announced (0 = between chunks)
        self._cur_run = self.run   # row length of the current chunk's bytes
        self._want_crc = 0
        self._crc = 0
        self._bits: np.ndarray | None = None   # the current chunk's bitstream, if CODEC
        self.done = False
        #: Chunks that came as lossy bitstreams (decoded KV, not the exact bytes).
        self.lossy: set[int] = set()

    def tokens_of(self, index: int) -> int:
        """Tokens chunk ``index`` must hold."""
        return self.last_tokens if index == self.n_keys - 1 else self.ns.chunk_tokens

    @property
    def matched_tokens(self) -> int:
        return sum(self.tokens_of(i) for i in range(self.matched))

    def _check(self, index: int, num_tokens: int, encoding: Encoding, nbytes: int, what: str) -> None:
        """DataLoss unless chunk ``index`` came with the tokens and size it must have."""
        want = self.tokens_of(index)
        if num_tokens != want or encoding not in (Encoding.RAW, Encoding.CODEC) or \
                (encoding == Encoding.RAW and nbytes != self.ns.chunk_bytes(want)):
            raise DataLoss(f"chunk {index}: the daemon {what} {nbytes} bytes of {Encoding(encoding).name} with "
                           f"{num_tokens} tokens, expected {want} tokens ({self.ns.chunk_bytes(want)} bytes RAW)")

    def feed(self, msg, index_base: int = 0) -> bool:
        """Takes one response; returns False once the prefix has ended (the caller may cancel).
        ``index_base``: the request's first key is chunk ``index_base`` of the output."""
        if isinstance(msg, memoryview):
            self._data(msg)
            return True
        if not msg.HasField("header") or self._off != self._expect:
            raise DataLoss("malformed Get stream: a header arrived before the previous chunk's data ended")
        h = msg.header
        if not h.found or h.index + index_base != self.matched:
            self.done = True
            return False
        self._check(self.matched, h.num_tokens, h.encoding, h.payload_bytes, "returned")
        self._bits = np.empty(h.payload_bytes, np.uint8) if h.encoding == Encoding.CODEC else None  # collected whole
        self._cur_run = h.num_tokens * self.token_run
        self._off, self._expect, self._want_crc, self._crc = 0, h.payload_bytes, h.crc32c, 0
        return True

    def place(self, payload: np.ndarray, num_tokens: int, encoding: Encoding, crc: int) -> None:
        """Copies one whole chunk (a uint8 array, e.g. a view of the shared arena) into place."""
        self._place_at(self.matched, payload, num_tokens, encoding, crc)
        self.matched += 1

    def place_many(self, items: list[tuple], pool=None) -> None:
        """``place`` for consecutive chunks, copied (or decoded) in parallel on ``pool``: each
        chunk owns its own columns of the output, and numpy and the codec release the GIL."""
        start = self.matched
        if pool is None or len(items) < 2:
            for item in items:
                self.place(*item)
            return
        futures = [pool.submit(self._place_at, start + k, *item) for k, item in enumerate(items)]
        for f in futures:
            f.result()
        self.matched += len(items)

    def _place_at(self, index: int, payload: np.ndarray, num_tokens: int, encoding: Encoding, crc: int) -> None:
        self._check(index, num_tokens, encoding, payload.nbytes, "leased")
        if self.verify and crc and _crc.crc32c(payload) != crc:
            raise DataLoss(f"chunk {index}: CRC32C mismatch in the shared arena")
        if encoding == Encoding.CODEC:
            self._write_decoded(index, payload)
        else:
            self._write(index, payload)

    def _place_decoded(self, bits) -> None:
        self._write_decoded(self.matched, bits)
        self.matched += 1

    def _write_decoded(self, index: int, bits) -> None:
        if is_lossy(bits):
            self.lossy.add(index)
        raw = decode_chunk(bits)
        want = self.ns.chunk_bytes(self.tokens_of(index))
        if raw.nbytes != want:
            raise DataLoss(f"chunk {index}: the bitstream decodes to {raw.nbytes} bytes, expected {want}")
        self._write(index, raw)

    def _write(self, index: int, raw: np.ndarray) -> None:
        """Chunk ``index``'s bytes into its columns of the output: one memcpy per row (native,
        GIL released) where the native library is installed."""
        base, run = index * self.run, self.tokens_of(index) * self.token_run
        dst, src = self.out[:, base:base + run], raw.reshape(self.rows, run)
        if native_copy_rows is not None:
            native_copy_rows(dst, src)
        else:
            dst[...] = src

    def _data(self, piece: memoryview) -> None:
        m = piece.nbytes
        if self._off + m > self._expect:
            raise DataLoss("the daemon sent more data than the chunk header announced")
        if self._bits is not None:
            self._bits[self._off:self._off + m] = np.frombuffer(piece, np.uint8)
            self._off += m
            if self._off == self._expect:
                if self.verify and self._want_crc and _crc.crc32c(self._bits) != self._want_crc:
                    raise DataLoss(f"chunk {self.matched}: CRC32C mismatch after transfer")
                bits, self._bits = self._bits, None
                self._off = self._expect = 0
                self._place_decoded(bits)
            return
        if self.verify and self._want_crc:
            self._crc = _crc.crc32c(piece, self._crc)
        src = np.frombuffer(piece, np.uint8)
        run, base = self._cur_run, self.matched * self.run
        out, pos, off = self.out, 0, self._off
        while pos < m:
            r, c = divmod(off + pos, run)
            if c == 0 and m - pos >= run:
                k = (m - pos) // run
                out[r:r + k, base:base + run] = src[pos:pos + k * run].reshape(k, run)
                pos += k * run
            else:
                take = min(run - c, m - pos)
                out[r, base + c:base + c + take] = src[pos:pos + take]
                pos += take
        self._off += m
        if self._off == self._expect:
            if self.verify and self._want_crc and self._crc != self._want_crc:
                raise DataLoss(f"chunk {self.matched}: CRC32C mismatch after transfer "
                               f"({self._crc:#x} != {self._want_crc:#x})")
            self.matched += 1
            self._off = self._expect = 0

    def result(self, as_torch: bool):
        """``[layers, 2, matched tokens, kv_heads, head_dim]`` (MLA: ``[layers, tokens, dim]``)."""
        ns, t = self.ns, self.matched_tokens
        u8 = self.out if t == self.total_tokens else np.ascontiguousarray(self.out[:, :t * self.token_run])
        shape = list(ns.chunk_shape(t))
        shape[-1] *= ns.dtype.itemsize
        u8 = u8.reshape(shape)
        if as_torch:
            import torch

            tdt = torch_dtype(ns.dtype)
            return torch.from_numpy(u8).view(tdt)
        return u8.view(_NUMPY_OUT[ns.dtype])
