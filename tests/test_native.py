import os
import re
import shutil
import subprocess
import zlib
from pathlib import Path

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


@pytest.mark.parametrize("start,length", [(0, 0), (3, 100), (0, 256 << 10), (5, (1 << 20) + 77), (64, 3 << 20)])
def test_zero_clears_exactly_the_range(start, length):
    buf = np.full(start + length + 200, 0x5A, np.uint8)
    native.zero(memoryview(buf)[start:start + length])
    assert not buf[start:start + length].any()
    assert (buf[:start] == 0x5A).all() and (buf[start + length:] == 0x5A).all()
    with pytest.raises(ValueError, match="read-only"):
        native.zero(bytes(8))


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


def _exported(path) -> list[str]:
    """Names of the functions a shared library exports (``nm -D --defined-only``)."""
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
    return sorted(line.split()[-1] for line in out.splitlines() if line.split()[1:2] == ["T"])


def _lib_path(name: str):
    from kvstore_native import _lib

    return _lib.LIB_DIR / name


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_library_exports_one_crc32c_and_only_the_kvs_abi():
    names = _exported(_lib_path("libkvstore.so"))
    # One CRC32C implementation: the fused copy calls kvs_crc32c block by block.
    assert sorted(n for n in names if "crc" in n.lower()) == ["kvs_copy2d_crc32c", "kvs_crc32c"]
    assert names and all(n.startswith("kvs_") for n in names), names
    assert not any(n.startswith("kvc_") for n in names)


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_cuda_library_exports_only_kvs_cuda_functions_and_links_the_core_for_crc():
    path = _lib_path("libkvstore_cuda.so")
    if not path.exists():
        pytest.skip("libkvstore_cuda.so is built only where nvcc exists")
    names = _exported(path)
    assert names and all(n.startswith("kvs_cuda_") or n == "kvs_abi_version" for n in names), names
    # The CPU CRC32C lives in the core library only (the CUDA one has the GPU kernels' batch,
    # combine and fold, all kvs_cuda_*).
    assert "kvs_crc32c" not in names


def test_fused_copy_returns_the_crc_of_what_it_wrote():
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (30, 70_001), dtype=np.uint8)[:, 1:]     # pitched rows, odd offset
    dst = np.zeros((30, 70_000), np.uint8)
    crc = native.copy_rows_crc32c(dst, src)
    assert np.array_equal(dst, src) and crc == native.crc32c(np.ascontiguousarray(src))
    assert native.copy_rows_crc32c(dst[:, :0], src[:, :0], crc) == crc    # nothing written: unchanged


def test_abi_version_matches_the_header_and_the_bindings():
    from kvstore_native import _lib

    header = (Path(__file__).resolve().parents[1] / "native/include/kvstore.h").read_text()
    version = int(re.search(r"#define KVS_ABI_VERSION (\d+)", header).group(1))
    assert native.lib().kvs_abi_version() == version == native.ABI_VERSION == _lib.ABI_VERSION


def test_error_codes_of_the_bindings_match_the_header():
    from kvstore_native import _lib

    header = (Path(__file__).resolve().parents[1] / "native/include/kvstore.h").read_text()
    codes = {m.group(1): int(m.group(2)) for m in re.finditer(r"#define KVS_(E[A-Z]+) \((-\d+)\)", header)}
    assert codes and all(getattr(_lib, name) == value for name, value in codes.items())


def test_loader_refuses_a_missing_library_with_a_clear_import_error(tmp_path, monkeypatch):
    from kvstore_native import _lib

    with pytest.raises(native.NativeLibraryMissing, match="missing"):
        _lib._load(tmp_path / "libnothing.so", {}, "build it")


def test_transfer_errors_carry_the_native_code():
    from kvstore_native import _lib
    from kvstore_native.transfer import PlaneSpec, TransferError, gather

    buf = np.zeros(16, np.uint8)
    with pytest.raises(TransferError) as ei:
        gather(PlaneSpec([buf.ctypes.data], [0], 0, 4, 4, 4), buf.ctypes.data, device=False)
    assert ei.value.code == _lib.EINVAL and "kvs_gather" in str(ei.value)
