"""Lane counts on the GPU (64 and 128 rANS lanes per segment, docs/bitstream.md): the batched
encoder writes the CPU encoder's bytes for every lane count; every decoder (batch, pipelined,
mapped into paged layouts, the first decoder's fallback) decodes them bit-exactly, also with
chunks of different lane counts in one call; unknown counts are refused on the device. Skipped
without CUDA (tests/gpu/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

import kvstore_native as native
import kvstore_native.codec as kc
from kvstore_native import transfer
from kvstore_testing.codec_data import fix_checksums

from .test_codec_batch import LOSSY, _bits, _chunks, _dev
from .test_codec_mapped import Case

pytestmark = pytest.mark.gpu
WIDE = [64, 128]


@pytest.fixture(autouse=True)
def _defaults():
    from kvstore_native.codec import gpu

    yield
    gpu.set_decoder()
    gpu.set_encoder()


@pytest.mark.parametrize("encoder", ["global", "tile"])
@pytest.mark.parametrize("lanes", WIDE)
@pytest.mark.parametrize("kind", ["f16", "bf16", "f32", "mla"])
def test_encode_batch_matches_cpu_for_every_lane_count(kind, lanes, encoder):
    import torch

    from kvstore_native.codec import gpu

    gpu.set_encoder(encoder)
    hosts, layout, bf16 = _chunks(kind, 3)
    devs = [_dev(torch, h, bf16) for h in hosts]
    for level in LOSSY:
        want = [kc.encode(h, level, layout, bf16=bf16, lanes=lanes) for h in hosts]
        assert gpu.encode_batch(devs, level, layout, lanes=lanes) == want
        assert kc.info(want[0]).lanes == lanes
    assert gpu.encode(devs[0], kc.CodecLevel.DEFAULT, layout, lanes=lanes) == \
        kc.encode(hosts[0], kc.CodecLevel.DEFAULT, layout, bf16=bf16, lanes=lanes)


def test_encode_batch_refuses_unknown_lane_counts():
    import torch

    from kvstore_native.codec import gpu

    hosts, layout, bf16 = _chunks("f16", 1)
    for bad in (16, 48, 256):
        with pytest.raises(kc.CodecError, match="lanes"):
            gpu.encode_batch([_dev(torch, hosts[0], bf16)], kc.CodecLevel.DEFAULT, layout, lanes=bad)


@pytest.mark.parametrize("decoder", ["first", "warp-smem", "warp-smem-hw", "warp-global", "warp-global-hw",
                                     "warp-smem-hw-short"])
@pytest.mark.parametrize("kind", ["f16", "bf16", "f32", "mla"])
def test_every_decoder_reads_every_lane_count(decoder, kind):
    import torch

    from kvstore_native.codec import gpu

    hosts, layout, bf16 = _chunks(kind, 3)
    gpu.set_decoder(decoder, 4)
    for level in LOSSY:
        # one batch of chunks with 32, 64 and 128 lanes
        blobs = [kc.encode(h, level, layout, bf16=bf16, lanes=ln) for h, ln in zip(hosts, (32, 64, 128))]
        outs = [torch.empty_like(_dev(torch, h, bf16)) for h in hosts]
        gpu.decode_batch(blobs, outs)
        for b, o in zip(blobs, outs):
            assert _bits(torch, o) == np.ascontiguousarray(kc.decode(b)).tobytes()
        for lanes in WIDE:  # and each count alone
            b = kc.encode(hosts[0], level, layout, bf16=bf16, lanes=lanes)
            gpu.decode_batch([b], outs[:1])
            assert _bits(torch, outs[0]) == np.ascontiguousarray(kc.decode(b)).tobytes()


@pytest.mark.parametrize("groups", [1, 2, 0])
def test_pipelined_load_of_mixed_lane_counts(groups):
    import torch

    from kvstore_native.codec import gpu

    hosts, layout, _ = _chunks("f16", 6)
    for level in LOSSY:
        blobs = [kc.encode(h, level, layout, lanes=(32, 64, 128)[i % 3]) for i, h in enumerate(hosts)]
        pinned = [torch.frombuffer(bytearray(b), dtype=torch.uint8).pin_memory() for b in blobs]
        outs = [torch.empty(h.shape, dtype=torch.float16, device="cuda") for h in hosts]
        gpu.load_batch(pinned, outs, groups=groups, verify=True)
        for b, o in zip(blobs, outs):
            assert _bits(torch, o) == kc.decode(b).tobytes()


def _wide_blobs(c: Case, lanes_of) -> list[bytes]:
    """c's chunks encoded with lanes_of(i) lanes (the same decoded values, other bytes)."""
    return [kc.encode(h, c.level, c.klayout, bf16=c.bf16, lanes=lanes_of(i)) for i, h in enumerate(c.hosts)]


@pytest.mark.parametrize("decoder", ["warp-smem-hw", "warp-smem-hw-short"])
@pytest.mark.parametrize("layout", transfer.PAGED_LAYOUTS)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_mapped_load_of_mixed_lane_counts_into_every_paged_layout(layout, dtype, decoder):
    from kvstore_native.codec import gpu

    gpu.set_decoder(decoder, 4)
    for level in LOSSY:
        c = Case(layout, dtype, 5, level=level, seed=int(level) + 10)
        blobs = _wide_blobs(c, lambda i: (128, 32, 64, 128, 64)[i])
        for b, w in zip(blobs, c.want):  # the values the CPU decodes from the wide streams
            assert np.ascontiguousarray(kc.decode(b)).view(np.uint16).tobytes() == w
        r = c.load(blobs=blobs)
        assert (r.proven, r.failed, r.placed) == (5, None, 5), r.error
        for i in range(5):
            assert c.chunk_bytes(i) == c.want[i], (layout, dtype, level, i)
        assert c.outside_untouched()


def test_mapped_load_refuses_an_unknown_lane_count_on_the_device():
    c = Case("fa_nhd", "f16", 4)
    blobs = _wide_blobs(c, lambda i: 64)
    for bad in (0, 48, 96, 255):
        m = bytearray(blobs[2])
        m[33] = bad
        r = c.load(blobs=blobs[:2] + [fix_checksums(bytes(m))] + blobs[3:])
        assert r.proven == 4 and r.failed == 2 and r.placed == 2, (bad, r)
        assert "header" in r.error
        assert c.chunk_bytes(0) == c.want[0] and c.chunk_bytes(1) == c.want[1] and c.untouched(2)
        assert c.outside_untouched()
    # a stream read with the wrong (valid) lane count: rejected by the decoder's own checks
    m = bytearray(blobs[1])
    m[33] = 32
    r = c.load(blobs=[blobs[0], fix_checksums(bytes(m))] + blobs[2:])
    assert r.failed == 1 and r.placed == 1 and c.chunk_bytes(0) == c.want[0]
    assert c.outside_untouched()
    r = c.load(blobs=blobs)
    assert r.placed == 4 and all(c.chunk_bytes(i) == c.want[i] for i in range(4))


def test_hostile_wide_streams_never_escape_their_chunk():
    torch = pytest.importorskip("torch")
    c = Case("fa_hnd", "f16", 3)
    blobs = _wide_blobs(c, lambda i: 128)
    rng = np.random.default_rng(11)
    for _ in range(40):
        m = bytearray(blobs[1])
        for pos in rng.integers(64, len(m), 3):
            m[pos] ^= int(rng.integers(1, 256))
        r = c.load(blobs=[blobs[0], fix_checksums(bytes(m)), blobs[2]])
        assert r.placed >= 1 and c.chunk_bytes(0) == c.want[0]
        assert c.outside_untouched()
    torch.cuda.synchronize()
    assert native.crc32c(blobs[0]) == native.crc32c(bytes(blobs[0]))
