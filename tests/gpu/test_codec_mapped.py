"""Mapped compressed loads (``kvs_cuda_codec_load_mapped``): bitstreams decoded on the GPU straight
into engine memory laid out as vLLM keeps it (every paged layout, by its strides), bit-exact with
the CPU decoder and CPU-side placement; a chunk is written only inside the prefix whose
bitstreams landed with their stored CRC32C; headers checked on the device; hostile streams never
crash the context nor write outside their chunk. Skipped without CUDA (tests/gpu/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

import kvstore_native as native
import kvstore_native.codec as kc
from kvstore_native import transfer
from kvstore_testing.codec_data import fix_checksums, synthetic_kv

pytestmark = pytest.mark.gpu
LOSSY = [kc.CodecLevel.NEAR_LOSSLESS, kc.CodecLevel.DEFAULT, kc.CodecLevel.AGGRESSIVE]
BS = 16          # tokens per paged block
POISON = 0x7BAD  # every element of the caches before a load (a finite fp16 / bf16 value)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


class Case:
    """``chunks`` host chunks, their bitstreams at ``level``, and per-layer paged caches in ``layout``
    (poisoned) with the chunks' tokens spread over shuffled blocks."""

    def __init__(self, layout: str, dtype: str, chunks: int, level=kc.CodecLevel.DEFAULT, seed: int = 0) -> None:
        import torch

        self.torch = torch
        self.layout = layout
        mla = layout == "mla"
        self.L, self.T, self.H, self.D = (3, 64, 1, 96) if mla else (4, 96, 2, 48)
        self.klayout = kc.Layout.MLA if mla else kc.Layout.KV
        self.bf16 = dtype == "bf16"
        rng = np.random.default_rng(seed)
        hosts = []
        for i in range(chunks):
            x = (rng.normal(0, 1, (self.L, self.T, self.D)).astype(np.float32) if mla else
                 synthetic_kv(self.L, self.T, self.H, self.D, seed=seed * 100 + i, dtype=np.float32))
            hosts.append(_bf16_bits(x) if self.bf16 else x.astype(np.float16))
        self.hosts, self.level = hosts, level
        self.blobs = [kc.encode(h, level, self.klayout, bf16=self.bf16) for h in hosts]
        self.want = [np.ascontiguousarray(kc.decode(b)).view(np.uint16).tobytes() for b in self.blobs]
        tdt = torch.bfloat16 if self.bf16 else torch.float16
        nb = chunks * self.T // BS + 5
        L, H, D = self.L, self.H, self.D
        shape = {"fa_nhd": (2, nb, BS, H, D), "fa_hnd": (2, nb, H, BS, D), "fi_nhd": (nb, 2, BS, H, D),
                 "fi_hnd": (nb, 2, H, BS, D), "separate_nhd": (2, nb, BS, H, D), "separate_hnd": (2, nb, H, BS, D),
                 "mla": (nb, BS, D)}[layout]
        if layout == "fi_nhd":   # per-layer strided views into one buffer (vLLM's layers-in-one allocation)
            whole = torch.full((nb, L, 2, BS, H, D), POISON, dtype=torch.int16, device="cuda").view(tdt)
            self.caches = [whole[:, l] for l in range(L)]
        else:
            self.caches = [torch.full(shape, POISON, dtype=torch.int16, device="cuda").view(tdt) for _ in range(L)]
        ids = torch.randperm(nb, generator=torch.Generator().manual_seed(seed))[: chunks * self.T // BS].tolist()
        self.ids = ids
        self.specs = [transfer.paged_spec(self.caches, layout, ids, self.T, i * self.T) for i in range(chunks)]
        self.pinned = [torch.frombuffer(bytearray(b), dtype=torch.uint8).pin_memory() for b in self.blobs]

    def load(self, want_crcs="stored", groups: int = 0, verify_host: bool = False, blobs=None):
        from kvstore_native.codec import gpu

        torch = self.torch
        if blobs is not None:
            self.pinned = [torch.frombuffer(bytearray(b), dtype=torch.uint8).pin_memory() for b in blobs]
        crcs = [native.crc32c(b) for b in (self.blobs if blobs is None else blobs)] if want_crcs == "stored" else want_crcs
        dt = kc.DType.BFLOAT16 if self.bf16 else kc.DType.FLOAT16
        st = torch.cuda.current_stream()
        return gpu.load_mapped([int(p.data_ptr()) for p in self.pinned], [int(p.numel()) for p in self.pinned],
                               dt, self.klayout, (self.L, self.T, self.H, self.D), self.dmap(), st.cuda_stream,
                               want_crcs=crcs, groups=groups, verify_host=verify_host)

    def dmap(self, planes_of=lambda planes: planes, run_elems: int | None = None):
        """The caches' ``DecodeMap``, built here from the plane specs (not by the client's
        ``decode_map``); ``planes_of`` / ``run_elems`` bend it for the argument checks."""
        from kvstore_native.codec import gpu

        s0 = self.specs[0]
        planes = np.array([list(sp.ptrs) for sp in self.specs], dtype=np.uint64)
        toks = np.array([list(sp.slots) for sp in self.specs], dtype=np.uint64) * np.uint64(s0.token_stride)
        return gpu.DecodeMap(planes_of(planes), toks, s0.head_bytes // 2 if run_elems is None else run_elems,
                             s0.head_stride)

    def chunk_bytes(self, i: int) -> bytes:
        """Chunk i as it sits in the caches now, gathered back into the chunk layout."""
        torch = self.torch
        sp = self.specs[i]
        out = torch.empty(sp.chunk_bytes, dtype=torch.uint8, device="cuda")
        transfer.gather(sp, int(out.data_ptr()), device=True)
        torch.cuda.synchronize()
        return out.cpu().numpy().tobytes()

    def untouched(self, i: int) -> bool:
        return self.chunk_bytes(i) == np.full(self.specs[i].chunk_bytes // 2, POISON, dtype=np.uint16).tobytes()

    def outside_untouched(self) -> bool:
        """Every block no chunk owns still holds the poison."""
        torch = self.torch
        blocks = transfer.paged_views(self.caches[0], self.layout)[0].shape[0]
        free = sorted(set(range(blocks)) - set(self.ids))
        for c in self.caches:
            for v in transfer.paged_views(c, self.layout):
                if not torch.all(v[free].contiguous().view(torch.int16) == POISON):
                    return False
        return True


#: The decoders a mapped load can run (kvs_cuda_codec_set_decoder): the default and the variant
#: with the shorter symbol chain; both must place the same bits.
MAPPED_DECODERS = ["warp-smem-hw", "warp-smem-hw-short"]


@pytest.fixture
def decoder(request):
    from kvstore_native.codec import gpu

    gpu.set_decoder(request.param, 4)
    yield request.param
    gpu.set_decoder()   # the default


@pytest.mark.parametrize("decoder", MAPPED_DECODERS, indirect=True)
@pytest.mark.parametrize("layout", transfer.PAGED_LAYOUTS)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_mapped_load_into_every_paged_layout_matches_the_cpu_decoder(layout, dtype, decoder):
    for level in LOSSY:
        c = Case(layout, dtype, 5, level=level, seed=int(level))
        r = c.load()
        assert (r.proven, r.failed, r.placed) == (5, None, 5), r.error
        for i in range(5):
            assert c.chunk_bytes(i) == c.want[i], (layout, dtype, level, i)
        assert c.outside_untouched()


@pytest.mark.parametrize("groups", [1, 2, 3, 0])
def test_mapped_load_groups_and_no_check(groups):
    c = Case("fa_hnd", "f16", 6)
    r = c.load(groups=groups)
    assert r.placed == 6 and all(c.chunk_bytes(i) == c.want[i] for i in range(6))
    c = Case("fa_nhd", "bf16", 3)
    r = c.load(want_crcs=None, groups=groups)   # no gate: every chunk decodes
    assert (r.proven, r.placed) == (3, 3) and all(c.chunk_bytes(i) == c.want[i] for i in range(3))


def test_only_the_proven_prefix_is_written():
    c = Case("fa_nhd", "f16", 5)
    crcs = [native.crc32c(b) for b in c.blobs]
    crcs[2] ^= 1   # chunk 2's bitstream "changed" since it was stored
    r = c.load(want_crcs=crcs, groups=3)
    assert (r.proven, r.failed, r.placed) == (2, None, 2)
    assert [c.chunk_bytes(i) == c.want[i] for i in range(2)] == [True, True]
    assert all(c.untouched(i) for i in (2, 3, 4))   # chunks after it are never written either
    c = Case("fi_hnd", "bf16", 3)
    crcs = [native.crc32c(b) for b in c.blobs]
    crcs[0] ^= 1
    r = c.load(want_crcs=crcs)
    assert r.placed == 0 and all(c.untouched(i) for i in range(3))


def test_headers_are_checked_on_the_device():
    """A proven bitstream of another shape, dtype or level (lossless) decodes nothing of its chunk."""
    c = Case("fa_nhd", "f16", 4)
    other = kc.encode(synthetic_kv(c.L, c.T // 2, c.H, c.D), kc.CodecLevel.DEFAULT)          # fewer tokens
    wide = kc.encode(synthetic_kv(c.L, c.T, c.H, c.D, dtype=np.float32), kc.CodecLevel.DEFAULT)  # fp32
    lossless = kc.encode(synthetic_kv(c.L, c.T, c.H, c.D), kc.CodecLevel.LOSSLESS)
    for bad in (other, wide, lossless):
        blobs = [c.blobs[0], bad] + c.blobs[2:]
        r = c.load(blobs=blobs)   # CRCs of what is there: proven, but not the chunk expected
        assert r.proven == 4 and r.failed == 1 and r.placed == 1
        assert "header" in r.error
        assert c.chunk_bytes(0) == c.want[0] and c.untouched(1)
        assert c.outside_untouched()


def test_verify_host_refuses_a_bad_layer_checksum():
    c = Case("separate_nhd", "f16", 3)
    bad = bytearray(c.blobs[1])
    bad[len(bad) // 2] ^= 0x5A   # a payload byte: only the layer CRC can tell
    blobs = [c.blobs[0], bytes(bad), c.blobs[2]]
    r = c.load(blobs=blobs, verify_host=True)
    assert (r.failed, r.placed) == (1, 1) and "checksum" in r.error
    assert c.chunk_bytes(0) == c.want[0] and c.untouched(1) and c.untouched(2)


@pytest.mark.parametrize("decoder", MAPPED_DECODERS, indirect=True)
def test_hostile_bitstreams_never_escape_their_chunk(decoder):
    """Corrupt streams whose CRCs were recomputed (so every check up to the decoder passes): the
    decoder rejects or decodes them, writes nothing outside its chunk, and the context survives."""
    torch = pytest.importorskip("torch")
    c = Case("fa_hnd", "f16", 3)
    rng = np.random.default_rng(5)
    b = c.blobs[1]
    for _ in range(40):
        m = bytearray(b)
        for pos in rng.integers(64, len(b), 3):
            m[pos] ^= int(rng.integers(1, 256))
        blobs = [c.blobs[0], fix_checksums(bytes(m)), c.blobs[2]]
        r = c.load(blobs=blobs)
        assert r.placed >= 1 and c.chunk_bytes(0) == c.want[0]
        assert c.outside_untouched()
    torch.cuda.synchronize()
    r = c.load(blobs=c.blobs)
    assert r.placed == 3 and all(c.chunk_bytes(i) == c.want[i] for i in range(3))


def test_bad_arguments_are_refused():
    from kvstore_native.codec import gpu

    c = Case("fa_nhd", "f16", 2)
    ptrs, lens = [int(p.data_ptr()) for p in c.pinned], [int(p.numel()) for p in c.pinned]
    args = (kc.DType.FLOAT16, kc.Layout.KV, (c.L, c.T, c.H, c.D))
    with pytest.raises(kc.CodecError):   # runs that do not tile the channels
        gpu.load_mapped(ptrs, lens, *args, c.dmap(run_elems=7), 0)
    with pytest.raises(kc.CodecError):   # a null plane
        gpu.load_mapped(ptrs, lens, *args, c.dmap(lambda planes: planes * 0), 0)
    with pytest.raises(kc.CodecError):   # a map of the wrong size
        gpu.load_mapped(ptrs, lens, *args, c.dmap(lambda planes: planes[:, :3]), 0)
    m = c.dmap()
    with pytest.raises(kc.CodecError):   # a shape the codec does not take
        gpu.load_mapped(ptrs, lens, kc.DType.FLOAT16, kc.Layout.KV, (c.L, 0, c.H, c.D),
                        gpu.DecodeMap(m.planes, m.toks[:, :0], m.run_elems, m.run_stride), 0)
    assert c.untouched(0) and c.untouched(1)
