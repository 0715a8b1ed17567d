import os
import zlib

import numpy as np
import pytest

import kvstore_native as native


def crc32c_reference(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


def test_crc32c_known_vectors():
    # RFC 3720 (iSCSI) B.4 test vectors.
    assert native.crc32c(b"") == 0
    assert native.crc32c(b"123456789") == 0xE3069283
    assert native.crc32c(bytes(32)) == 0x8A9136AA
    assert native.crc32c(bytes([0xFF] * 32)) == 0x62A8AB43
    assert native.crc32c(bytes(range(32))) == 0x46DD794E


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 13, 100_003])
def test_crc32c_matches_bitwise_reference_and_streaming(n):
    data = os.urandom(n)
    ref = crc32c_reference(data) if n <= 30000 else None
    whole = native.crc32c(data)
    if ref is not None:
        assert whole == ref
    cut = n // 3
    assert native.crc32c(data[cut:], native.crc32c(data[:cut])) == whole
    assert whole != zlib.crc32(data) or n == 0  # it is Castagnoli, not the zlib polynomial


def test_crc32c_large_multi_stream_path_matches_streamed_pieces():
    data = np.random.default_rng(0).integers(0, 256, size=5 * 1024 * 1024 + 17, dtype=np.uint8)
    whole = native.crc32c(data)
    crc = 0
    for i in range(0, data.size, 4096):
        crc = native.crc32c(data[i:i + 4096], crc)
    assert crc == whole


def test_copy_into_threads():
    src = np.random.default_rng(1).integers(0, 256, size=20 * 1024 * 1024 + 5, dtype=np.uint8)
    dst = np.zeros(src.size + 10, dtype=np.uint8)
    native.copy_into(dst, src, threads=4)
    assert np.array_equal(dst[: src.size], src) and not dst[src.size:].any()
    with pytest.raises(ValueError):
        native.copy_into(bytearray(3), b"four")


def test_copy_rows_moves_a_block_into_columns_and_back():
    rng = np.random.default_rng(2)
    out = np.zeros((6, 4 * 1000), np.uint8)
    chunk = rng.integers(0, 256, size=(6, 1000), dtype=np.uint8)
    native.copy_rows(out[:, 2000:3000], chunk)
    assert np.array_equal(out[:, 2000:3000], chunk) and not out[:, :2000].any() and not out[:, 3000:].any()
    back = np.empty_like(chunk)
    native.copy_rows(back, out[:, 2000:3000])
    assert np.array_equal(back, chunk)
    with pytest.raises(ValueError):
        native.copy_rows(back, chunk[:, ::2])
