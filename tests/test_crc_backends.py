"""kvstore_wire.crc: every CRC32C backend available here agrees, and CRC is never off."""

import logging
import os

import numpy as np
import pytest

from kvstore_wire import crc

VECTORS = {  # RFC 3720 (iSCSI) B.4 and the classic check value
    b"": 0,
    b"123456789": 0xE3069283,
    bytes(32): 0x8A9136AA,
    bytes([0xFF] * 32): 0x62A8AB43,
    bytes(range(32)): 0x46DD794E,
}
SIZES = [0, 1, 2, 3, 63, 1000, crc._VECTOR_MIN_BYTES - 1, crc._VECTOR_MIN_BYTES, crc._VECTOR_MIN_BYTES + 1,
         100_003, (1 << 20) + 7]


def test_a_backend_is_always_selected_and_python_is_always_there():
    assert crc.BACKEND in ("native", "crc32c-wheel", "python") and crc.BACKEND in crc.BACKENDS
    assert "python" in crc.BACKENDS
    assert crc.HAVE_FAST_CRC == (crc.BACKEND != "python")


@pytest.mark.parametrize("backend", sorted(crc.BACKENDS))
def test_known_vectors(backend):
    fn = crc.BACKENDS[backend]
    for data, want in VECTORS.items():
        assert fn(data) == want, (backend, data[:12])


@pytest.mark.parametrize("backend", sorted(crc.BACKENDS))
@pytest.mark.parametrize("n", SIZES)
def test_backends_agree_and_continue(backend, n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    ref = crc.BACKENDS["python"](data)
    fn = crc.BACKENDS[backend]
    assert fn(data) == ref
    cut = n // 3
    assert fn(data[cut:], fn(data[:cut])) == ref  # crc(a || b) from crc(a)
    assert fn(np.frombuffer(data, np.uint8)) == ref  # any contiguous buffer
    assert crc.crc32c(memoryview(data)) == ref


def test_python_backend_takes_any_contiguous_buffer():
    a = np.arange(40_000, dtype=np.uint16)
    assert crc.BACKENDS["python"](a) == crc.BACKENDS["python"](a.tobytes())
    with pytest.raises(ValueError):
        crc.BACKENDS["python"](memoryview(a.tobytes())[::2])


def test_python_backend_warns_once_about_big_payloads(monkeypatch, caplog):
    monkeypatch.setattr(crc, "HAVE_FAST_CRC", False)
    monkeypatch.setattr(crc, "_impl", crc.BACKENDS["python"])
    monkeypatch.setattr(crc, "_warned", False)
    data = os.urandom(crc.SLOW_WARN_BYTES)
    with caplog.at_level(logging.WARNING, logger=crc.__name__):
        crc.crc32c(b"small")
        assert not caplog.records
        first = crc.crc32c(data)
        crc.crc32c(data)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "fast-crc" in warnings[0].getMessage()
    assert "kvstore-native" in warnings[0].getMessage()
    assert first == crc.BACKENDS["python"](data)


def test_without_the_native_library_crc_falls_back_and_stays_on(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, KVSTORE_NATIVE_LIB=str(tmp_path / "absent.so"))
    code = ("from kvstore_wire import crc; "
            "print(crc.BACKEND, crc.HAVE_FAST_CRC, crc.native_copy_rows, hex(crc.crc32c(b'123456789')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    backend, fast, copy_rows, value = out.split()
    assert backend in ("crc32c-wheel", "python") and fast == str(backend != "python")
    assert copy_rows == "None" and value == "0xe3069283"
