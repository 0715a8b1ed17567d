"""Round trips of every level, dtype and layout; edge inputs."""

from __future__ import annotations

import numpy as np
import pytest

import kvstore_native.codec as kc
from kvstore_native.codec.format import crc32c, parse_header, parse_index
from kvstore_native import crc32c as native_crc32c
from kvstore_native.codec import native

from kvstore_testing.codec_data import synthetic_kv

LOSSY = [kc.CodecLevel.NEAR_LOSSLESS, kc.CodecLevel.DEFAULT, kc.CodecLevel.AGGRESSIVE]


def bf16_bits(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def test_crc32c_vectors():
    assert crc32c(b"123456789") == 0xE3069283
    for data in (b"", b"a", b"123456789", bytes(range(256)) * 7):
        assert native_crc32c(data) == crc32c(data)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape", [(4, 64, 3, 64), (1, 1, 1, 1), (2, 7, 5, 3), (3, 300, 1, 40)])
def test_lossless_exact(dtype, shape):
    L, T, H, D = shape
    x = synthetic_kv(L, T, H, D, dtype=dtype)
    b = kc.encode(x, kc.CodecLevel.LOSSLESS)
    y = kc.decode(b)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.tobytes() == x.tobytes()


def test_lossless_bf16_and_special_values():
    x = synthetic_kv(2, 32, 2, 16, dtype=np.float32)
    x.flat[:4] = [np.nan, np.inf, -np.inf, -0.0]
    bits = bf16_bits(x)
    b = kc.encode(bits, kc.CodecLevel.LOSSLESS, bf16=True)
    assert kc.info(b).dtype == kc.DType.BFLOAT16
    y = kc.decode(b)
    assert y.view(np.uint16).tobytes() == bits.tobytes()


@pytest.mark.parametrize("level", LOSSY)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_lossy_error_is_bounded(level, dtype, kv_small):
    x = kv_small.astype(dtype)
    b = kc.encode(x, level)
    y = kc.decode(b)
    assert y.shape == x.shape and y.dtype == x.dtype
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    rms = np.sqrt((x.astype(np.float64) ** 2).mean())
    assert np.sqrt((err ** 2).mean()) < 0.35 * rms
    assert len(b) < x.astype(np.float16).nbytes / 2


def test_levels_trade_size_for_error(kv_small):
    sizes, errs = [], []
    for level in LOSSY:
        b = kc.encode(kv_small, level)
        sizes.append(len(b))
        errs.append(float(np.abs(kc.decode(b).astype(np.float32) - kv_small.astype(np.float32)).mean()))
    assert sizes == sorted(sizes, reverse=True)
    assert errs == sorted(errs)


def test_lossy_bf16(kv_small):
    bits = bf16_bits(kv_small)
    b = kc.encode(bits, kc.CodecLevel.DEFAULT, bf16=True)
    y = kc.decode(b).view(np.uint16)
    back = (y.astype(np.uint32) << 16).view(np.float32)
    ref = kc.decode(kc.encode(kv_small, kc.CodecLevel.DEFAULT)).astype(np.float32)
    ref_err = np.abs(ref - kv_small.astype(np.float32)).mean()
    assert np.abs(back - kv_small.astype(np.float32)).mean() < 1.5 * ref_err


@pytest.mark.parametrize("level", list(kc.CodecLevel))
def test_zero_and_constant_chunks(level):
    z = np.zeros((3, 2, 256, 3, 64), np.float16)
    b = kc.encode(z, level)
    assert len(b) < 0.02 * z.nbytes
    assert (kc.decode(b) == 0).all()
    c = np.full_like(z, 1.5)
    b = kc.encode(c, level)
    assert len(b) < 0.02 * z.nbytes
    np.testing.assert_allclose(kc.decode(b).astype(np.float32), 1.5, rtol=0.02)


def test_lossy_nan_inf_are_sanitised():
    x = synthetic_kv(2, 16, 1, 8, dtype=np.float32)
    x[0, 0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    y = kc.decode(kc.encode(x, kc.CodecLevel.DEFAULT))
    assert y[0, 0, 0, 0, 0] == 0
    assert not np.isnan(y).any()


def test_mla_layout():
    x = np.random.default_rng(3).normal(0, 1, (5, 40, 72)).astype(np.float16)
    for level in kc.CodecLevel:
        b = kc.encode(x, level, kc.Layout.MLA)
        h = kc.info(b)
        assert h.layout == kc.Layout.MLA and h.shape == x.shape
        y = kc.decode(b)
        if level == kc.CodecLevel.LOSSLESS:
            assert y.tobytes() == x.tobytes()
        else:
            assert np.abs(y.astype(np.float32) - x).mean() < 0.5


def test_layers_decode_independently(kv_small):
    b = kc.encode(kv_small, kc.CodecLevel.DEFAULT)
    full = kc.decode(b)
    for first, count in [(0, 1), (1, 2), (3, 1), (0, 4), (2, 0)]:
        part = kc.decode_layers(b, first, count)
        assert part.tobytes() == full[first:first + count].tobytes()


def test_decode_into_and_threads(kv_small):
    b = kc.encode(kv_small, kc.CodecLevel.DEFAULT, threads=3)
    assert b == kc.encode(kv_small, kc.CodecLevel.DEFAULT)
    out = np.empty_like(kv_small)
    kc.decode_into(b, out, threads=2)
    assert out.tobytes() == kc.decode(b).tobytes()
    with pytest.raises(kc.CodecError):
        kc.decode_into(b, np.empty((1, 2, 3), np.float16))


def test_python_header_view_matches_native(kv_small):
    b = kc.encode(kv_small, kc.CodecLevel.AGGRESSIVE)
    h = parse_header(b)
    assert h == kc.info(b).__class__(**{**kc.info(b).__dict__, "index_crc": h.index_crc})
    assert h.shape == kv_small.shape
    assert h.pack() == b[:64]
    idx = parse_index(b, h)
    assert sum(size for _, size, _ in idx) == h.payload_size
    po = h.payload_offset
    for off, size, crc in idx:
        assert crc32c(b[po + off: po + off + size]) == crc


def test_encode_rejects_bad_arguments():
    with pytest.raises(kc.CodecError):
        kc.encode(np.zeros((2, 3, 4, 5, 6), np.float16))  # K/V axis must be 2
    with pytest.raises(TypeError):
        kc.encode(np.zeros((2, 2, 4, 5, 6), np.int32))
    with pytest.raises(ValueError):
        kc.encode(np.zeros((2, 2, 4, 5, 6), np.float16), 9)


def test_software_conversions_are_ieee_round_to_nearest_even():
    """The portable conversions (used by the CUDA kernels) equal IEEE RNE bit for bit, so the
    CPU's hardware F16C path and the GPU's software path produce identical bytes."""
    import ctypes

    rng = np.random.default_rng(11)
    bits = np.concatenate([
        rng.integers(0, 1 << 32, 400_000, dtype=np.uint64).astype(np.uint32),
        np.arange(0x33000000 - 64, 0x38800000 + 64, 97, dtype=np.uint32),   # fp16 subnormal range
        np.arange(0x477FE000 - 64, 0x47800000 + 64, 1, dtype=np.uint32),   # fp16 overflow edge
        np.array([0, 0x80000000, 0x7F800000, 0xFF800000], dtype=np.uint32),
    ])
    f = bits.view(np.float32)
    f = f[~np.isnan(f)]
    out = np.empty(f.size, np.uint16)
    lib = native.lib()
    lib.kvs_codec_debug_convert(f.ctypes.data, out.ctypes.data, f.size, 1)
    with np.errstate(over="ignore"):
        assert (out == f.astype(np.float16).view(np.uint16)).all()
    lib.kvs_codec_debug_convert(f.ctypes.data, out.ctypes.data, f.size, 2)
    u = f.view(np.uint32).astype(np.uint64)
    ref = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    assert (out == ref).all()


def test_committed_model_tables_match_generator():
    """tables.h is part of the format: it must be exactly what the generator prints."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    gen = subprocess.run([sys.executable, str(root / "native/tools/gen_laplace_tables.py")],
                         capture_output=True, text=True, check=True).stdout
    assert gen == (root / "native/src/codec/tables.h").read_text()
