"""Batched GPU codec (codec_decode.cu, codec_load.cu, codec_encode.cu): bit-exact with the CPU
codec for every lossy level, dtype and layout; every decoder variant agrees; corrupt input is
rejected. Skipped where no CUDA device or libkvstore_cuda.so exists (tests/gpu/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

import kvstore_native.codec as kc
from kvstore_testing.codec_data import fix_checksums, synthetic_kv

pytestmark = pytest.mark.gpu
LOSSY = [kc.CodecLevel.NEAR_LOSSLESS, kc.CodecLevel.DEFAULT, kc.CodecLevel.AGGRESSIVE]


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _chunks(kind: str, count: int) -> tuple[list[np.ndarray], kc.Layout, bool]:
    """``count`` distinct host chunks of one shape: (arrays, layout, is_bf16 bits)."""
    if kind == "mla":
        rng = np.random.default_rng(3)
        return [rng.normal(0, 1, (3, 64, 96)).astype(np.float16) for _ in range(count)], kc.Layout.MLA, False
    xs = [synthetic_kv(4, 96, 2, 48, seed=s, dtype=np.float32) for s in range(count)]
    for x in xs:
        x[:, :, 0] *= 0.01  # an attention-sink-like token (raw rows)
    if kind == "bf16":
        return [_bf16_bits(x) for x in xs], kc.Layout.KV, True
    return [x.astype(np.float16 if kind == "f16" else np.float32) for x in xs], kc.Layout.KV, False


def _dev(torch, a: np.ndarray, bf16: bool):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t.view(torch.bfloat16) if bf16 else t).cuda()


def _bits(torch, t) -> bytes:
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).cpu().numpy().tobytes()


@pytest.fixture(autouse=True)
def _default_decoder():
    from kvstore_native.codec import gpu

    yield
    gpu.set_decoder()   # the default


@pytest.fixture
def encoder(request):
    from kvstore_native.codec import gpu

    gpu.set_encoder(request.param)
    yield request.param
    gpu.set_encoder()   # the default


@pytest.mark.parametrize("encoder", ["global", "tile"], indirect=True)
@pytest.mark.parametrize("level", LOSSY)
@pytest.mark.parametrize("kind", ["f16", "bf16", "f32", "mla"])
def test_encode_batch_matches_cpu(level, kind, encoder):
    import torch

    from kvstore_native.codec import gpu

    hosts, layout, bf16 = _chunks(kind, 3)
    devs = [_dev(torch, h, bf16) for h in hosts]
    got = gpu.encode_batch(devs, level, layout)
    assert got == [kc.encode(h, level, layout, bf16=bf16) for h in hosts]


@pytest.mark.parametrize("encoder", ["global", "tile"], indirect=True)
def test_encoders_match_cpu_on_special_values_and_unaligned_sources(encoder):
    """NaN, infinities, subnormals, signed zeros, constant channels and all-zero segments, from
    a 16-byte aligned source and from one 2 bytes off (the tile's scalar load path)."""
    import torch

    from kvstore_native.codec import gpu

    x = synthetic_kv(4, 64, 2, 32, seed=9, dtype=np.float32).astype(np.float16)
    flat = x.reshape(-1)
    flat[::97] = np.float16(np.nan)
    flat[5::89] = np.float16(np.inf)
    flat[7::83] = -np.float16(np.inf)
    flat[11::71] = np.float16(6e-8)    # subnormal
    flat[13::67] = -np.float16(0.0)
    x[1, 0, :, 0, :] = 0.5            # a constant channel block
    x[2] = 0                          # all-zero segments
    for level in LOSSY:
        want = kc.encode(x, level)
        assert gpu.encode_batch([_dev(torch, x, False)], level) == [want]
        buf = torch.empty(x.size + 1, dtype=torch.float16, device="cuda")
        buf[1:].copy_(torch.from_numpy(x.reshape(-1)))
        off = buf[1:].view(x.shape)   # 2 bytes past a 16-byte boundary
        assert gpu.encode_batch([off], level) == [want]
    xb = _bf16_bits(synthetic_kv(4, 64, 2, 32, seed=10, dtype=np.float32))
    xb.reshape(-1)[::53] = 0x7FC1   # NaN payloads
    xb.reshape(-1)[3::59] = 0xFF80  # -inf
    for level in LOSSY:
        assert gpu.encode_batch([_dev(torch, xb, True)], level, kc.Layout.KV) == [kc.encode(xb, level, bf16=True)]


@pytest.mark.parametrize("decoder", ["first", "warp-smem", "warp-smem-hw", "warp-global", "warp-global-hw",
                                     "warp-smem-hw-short"])
@pytest.mark.parametrize("kind", ["f16", "bf16", "f32"])
def test_decoder_variants_match_cpu(decoder, kind):
    import torch

    from kvstore_native.codec import gpu

    hosts, layout, bf16 = _chunks(kind, 3)
    gpu.set_decoder(decoder, 2)
    for level in LOSSY:
        blobs = [kc.encode(h, level, layout, bf16=bf16) for h in hosts]
        outs = [torch.empty_like(_dev(torch, h, bf16)) for h in hosts]
        gpu.decode_batch(blobs, outs)
        for b, o in zip(blobs, outs):
            assert _bits(torch, o) == np.ascontiguousarray(kc.decode(b)).tobytes()


@pytest.mark.parametrize("groups", [1, 3, 0])
@pytest.mark.parametrize("verify", [False, True])
def test_load_batch_matches_cpu(groups, verify):
    import torch

    from kvstore_native.codec import gpu

    hosts, layout, bf16 = _chunks("f16", 5)
    for level in LOSSY:
        blobs = [kc.encode(h, level, layout) for h in hosts]
        pinned = [torch.frombuffer(bytearray(b), dtype=torch.uint8).pin_memory() for b in blobs]
        outs = [torch.empty(h.shape, dtype=torch.float16, device="cuda") for h in hosts]
        gpu.load_batch(pinned, outs, groups=groups, verify=verify)
        for b, o in zip(blobs, outs):
            assert _bits(torch, o) == kc.decode(b).tobytes()


def test_load_batch_rejects_corrupt():
    import torch

    from kvstore_native.codec import gpu

    x = synthetic_kv(3, 64, 2, 32)
    b = kc.encode(x, kc.CodecLevel.DEFAULT)
    out = torch.empty(x.shape, dtype=torch.float16, device="cuda")
    with pytest.raises(kc.CodecError):
        gpu.load_batch([b[:-3]], [out])
    with pytest.raises(kc.CodecError):
        gpu.load_batch([kc.encode(x, kc.CodecLevel.LOSSLESS)], [out])
    bad = bytearray(b)
    bad[len(b) // 2] ^= 0x5A  # payload byte: only the layer CRC can tell
    with pytest.raises(kc.CodecError, match="checksum"):
        gpu.load_batch([bytes(bad)], [out], verify=True)
    rng = np.random.default_rng(7)
    for _ in range(60):  # CRCs recomputed: the decoder's own checks, never a crash
        m = bytearray(b)
        for pos in rng.integers(64 + 16 * 3, len(b), 3):
            m[pos] ^= int(rng.integers(1, 256))
        try:
            gpu.load_batch([fix_checksums(bytes(m))], [out])
        except kc.CodecError:
            pass
    torch.cuda.synchronize()  # the context survived every hostile stream
    gpu.load_batch([b], [out])
    assert out.cpu().numpy().tobytes() == kc.decode(b).tobytes()


def test_hardware_conversions_equal_portable():
    from kvstore_native.codec import gpu

    assert gpu.selftest_conversions() == (0, 0)
