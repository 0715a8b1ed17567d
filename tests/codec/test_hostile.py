"""Hostile input: every malformed bitstream is rejected with CodecError, never a crash.

The hypothesis fuzz test is bounded (well under 60 s); the long campaign is
bench/codec_fuzz.py.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvstore_native.codec as kc

from kvstore_testing.codec_data import fix_checksums, synthetic_kv

SEEDS = {}


def streams():
    if not SEEDS:
        x = synthetic_kv(3, 24, 2, 20, seed=7)
        for level in kc.CodecLevel:
            SEEDS[level] = kc.encode(x, level)
        SEEDS["mla"] = kc.encode(x.reshape(3, 48, 40)[:, :24], kc.CodecLevel.DEFAULT, kc.Layout.MLA)
        w = synthetic_kv(2, 24, 4, 40, seed=8)  # 160 channels: 64 and 128 lanes per segment
        SEEDS["lanes64"] = kc.encode(w, kc.CodecLevel.DEFAULT, lanes=64)
        SEEDS["lanes128"] = kc.encode(w, kc.CodecLevel.AGGRESSIVE, lanes=128)
    return SEEDS


def decode_or_error(buf: bytes, verify: bool = True) -> None:
    try:
        kc.decode(buf, verify=verify, max_decoded_bytes=1 << 24)
    except kc.CodecError as e:
        assert str(e)  # a message says what is wrong


@pytest.mark.parametrize("key", list(kc.CodecLevel) + ["mla", "lanes64", "lanes128"])
def test_every_truncation_is_rejected(key):
    b = streams()[key]
    for n in list(range(0, 200)) + list(range(200, len(b), 37)):
        with pytest.raises(kc.CodecError):
            kc.decode(b[:n])
    with pytest.raises(kc.CodecError, match="trailing|size mismatch"):
        kc.decode(b + b"\0")


@pytest.mark.parametrize("key", list(kc.CodecLevel))
def test_bit_flips_caught_by_checksum(key):
    b = streams()[key]
    rng = np.random.default_rng(1)
    for pos in rng.integers(0, len(b), 200):
        m = bytearray(b)
        m[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(kc.CodecError):
            kc.decode(bytes(m))


@pytest.mark.parametrize("key", list(kc.CodecLevel) + ["lanes64", "lanes128"])
def test_bit_flips_with_fixed_checksums_never_crash(key):
    b = streams()[key]
    rng = np.random.default_rng(2)
    for pos in rng.integers(64, len(b), 300):
        m = bytearray(b)
        m[pos] ^= 1 << int(rng.integers(0, 8))
        decode_or_error(fix_checksums(bytes(m)))


def craft(field_offset: int, fmt: str, value) -> bytes:
    m = bytearray(streams()[kc.CodecLevel.DEFAULT])
    struct.pack_into(fmt, m, field_offset, value)
    return fix_checksums(bytes(m))


@pytest.mark.parametrize("offset,fmt,value,match", [
    (12, "<I", 0xFFFFFFFF, "layers"),            # layer count huge
    (16, "<I", 0xFFFFFFFF, "tokens"),            # tokens huge
    (20, "<I", 1 << 20, "heads"),                # heads*head_dim overflow
    (24, "<I", 0xFFFFFFFF, "head"),
    (20, "<I", 0, "heads"),
    (8, "<B", 7, "codec"),
    (9, "<B", 9, "level"),
    (10, "<B", 0, "dtype"),
    (11, "<B", 3, "layout"),
    (4, "<H", 2, "version"),
    (36, "<Q", 1 << 62, "size mismatch"),
    (64, "<Q", 1 << 40, "outside the payload"),  # layer 0 offset
    (72, "<I", 0xFFFFFFFF, "outside the payload"),  # layer 0 size
    (28, "<I", 1, "flags"),
    (50, "<B", 1, "reserved"),
])
def test_crafted_headers(offset, fmt, value, match):
    with pytest.raises(kc.CodecError, match=match):
        kc.decode(craft(offset, fmt, value))


def test_rans_state_out_of_range():
    b = streams()[kc.CodecLevel.DEFAULT]
    h = kc.info(b)
    po = h.payload_offset
    R = struct.unpack_from('<H', b, po)[0]
    lane_table = po + 2 + R * (4 + 40 * 2) + 40 * 4  # raw tokens, then 40 channels * 4 bytes
    m = bytearray(b)
    struct.pack_into("<I", m, lane_table + 4, 5)  # lane 0 final state
    with pytest.raises(kc.CodecError, match="state"):
        kc.decode(fix_checksums(bytes(m)))
    struct.pack_into("<I", m, lane_table, 0xFFFFFF)  # lane 0 length
    with pytest.raises(kc.CodecError):
        kc.decode(fix_checksums(bytes(m)))


def test_wrong_magic_and_garbage():
    for junk in (b"", b"KVCZ", b"\0" * 64, b"KVCZ" + b"\xff" * 200, bytes(range(256))):
        with pytest.raises(kc.CodecError):
            kc.decode(junk)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(list(kc.CodecLevel) + ["mla", "lanes64", "lanes128"]),
       edits=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.integers(0, 1 << 30), fix=st.booleans())
def test_fuzz_mutations(key, edits, cut, fix):
    b = bytearray(streams()[key])
    for pos, val in edits:
        b[pos % len(b)] = val
    if cut % 5 == 0:
        b = b[: cut % (len(b) + 1)]
    data = fix_checksums(bytes(b)) if fix else bytes(b)
    decode_or_error(data, verify=True)
    decode_or_error(data, verify=False)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(min_size=0, max_size=600))
def test_fuzz_random_bytes_with_valid_magic(data):
    decode_or_error(fix_checksums(b"KVCZ\x01\x00\x40\x00" + data))


def test_huge_declared_shape_is_refused_before_allocation():
    b = craft(16, "<I", 1 << 20)  # tokens: a valid header declaring 500 MB of output
    with pytest.raises(kc.CodecError, match="max_decoded_bytes"):
        kc.decode(b, max_decoded_bytes=1 << 24)
    m = bytearray(b)
    struct.pack_into("<I", m, 20, 200)  # and 200 heads: beyond the format's element limit
    with pytest.raises(kc.CodecError, match="exceeds the limit"):
        kc.decode(fix_checksums(bytes(m)))
