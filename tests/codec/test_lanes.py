"""Lane counts of the lossy segments (docs/bitstream.md, header byte 33: 32, 64 or 128).

The lane count changes only how the symbols are split among rANS streams: every lane count
decodes to the same values, the default (32) keeps the bytes the format always had, and every
decoder rejects a count it does not know."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

import kvstore_native.codec as kc
from kvstore_native.codec.format import parse_header
from kvstore_testing.codec_data import fix_checksums, synthetic_kv

LOSSY = [kc.CodecLevel.NEAR_LOSSLESS, kc.CodecLevel.DEFAULT, kc.CodecLevel.AGGRESSIVE]
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "codec_v1_lanes32.json"


def golden_inputs():
    yield "kv", synthetic_kv(3, 40, 3, 64, seed=11), kc.Layout.KV
    yield "kv_small", synthetic_kv(2, 24, 2, 20, seed=7), kc.Layout.KV
    yield "mla", synthetic_kv(2, 40, 1, 96, seed=5).reshape(2, 80, 96)[:, :40], kc.Layout.MLA


def test_default_lanes_keep_the_bytes_of_the_format():
    want = json.loads(VECTORS.read_text())["digests"]
    got = {}
    for name, x, layout in golden_inputs():
        for level in kc.CodecLevel:
            for dt in ("f16", "f32"):
                a = np.ascontiguousarray(x.astype(np.float32 if dt == "f32" else np.float16))
                b = kc.encode(a, level, layout)
                assert b == kc.encode(a, level, layout, lanes=32)
                assert kc.info(b).lanes == 32
                got[f"{name}-{int(level)}-{dt}"] = hashlib.sha256(b).hexdigest()[:16]
    assert got == want


@pytest.mark.parametrize("lanes", [64, 128])
@pytest.mark.parametrize("level", LOSSY)
@pytest.mark.parametrize("shape", [(2, 2, 48, 3, 64), (2, 2, 33, 5, 8), (1, 2, 20, 2, 10), (2, 2, 17, 8, 32)])
def test_every_lane_count_decodes_to_the_same_values(lanes, level, shape):
    L, _, T, H, D = shape
    x = synthetic_kv(L, T, H, D, seed=sum(shape))
    for dtype in (np.float16, np.float32):
        a = x.astype(dtype)
        ref = kc.decode(kc.encode(a, level))
        b = kc.encode(a, level, lanes=lanes)
        h = kc.info(b)
        assert h.lanes == lanes and parse_header(b).lanes == lanes and parse_header(b).pack() == b[:64]
        np.testing.assert_array_equal(kc.decode(b), ref)
        np.testing.assert_array_equal(kc.decode(b, threads=2), ref)
        np.testing.assert_array_equal(kc.decode_layers(b, L - 1, 1), ref[L - 1:])
        # the lane table holds min(lanes, channels) entries per segment
        per_seg = min(lanes, H * D) * 8
        assert kc.size_breakdown(b)["lane_tables"] == L * 2 * per_seg


@pytest.mark.parametrize("level", LOSSY)
def test_lane_counts_for_mla_and_bf16(level):
    x = synthetic_kv(2, 40, 1, 192, seed=3).reshape(2, 80, 192)[:, :40]
    ref = kc.decode(kc.encode(x, level, kc.Layout.MLA))
    for lanes in (64, 128):
        np.testing.assert_array_equal(kc.decode(kc.encode(x, level, kc.Layout.MLA, lanes=lanes)), ref)
    bits = synthetic_kv(2, 24, 2, 96, seed=4).astype(np.float32).view(np.uint32) >> 16
    bf = np.ascontiguousarray(bits.astype(np.uint16))
    ref = kc.decode(kc.encode(bf, level, bf16=True))
    np.testing.assert_array_equal(kc.decode(kc.encode(bf, level, bf16=True, lanes=128)), ref)


def test_more_lanes_cost_eight_bytes_per_lane_and_segment():
    x = synthetic_kv(2, 64, 3, 64, seed=9)  # 192 channels
    n = {lanes: len(kc.encode(x, kc.CodecLevel.DEFAULT, lanes=lanes)) for lanes in (32, 64, 128)}
    # tables grow by 8 bytes per extra lane and segment; the coded data by a few bytes at most
    for lanes in (64, 128):
        extra = n[lanes] - n[32]
        assert extra >= 2 * 2 * (lanes - 32) * 8 - 2 * 2 * (lanes - 32) * 4
        assert extra <= 2 * 2 * (lanes - 32) * 8 + 2 * 2 * (lanes - 32) * 2


@pytest.mark.parametrize("bad", [0, 16, 31, 33, 48, 96, 255])
def test_unknown_lane_counts_are_rejected(bad):
    b = bytearray(kc.encode(synthetic_kv(2, 24, 2, 64, seed=1), kc.CodecLevel.DEFAULT, lanes=64))
    b[33] = bad
    with pytest.raises(kc.CodecError, match="lanes"):
        kc.decode(fix_checksums(bytes(b)))
    with pytest.raises(kc.CodecError, match="lanes"):
        kc.info(fix_checksums(bytes(b)))


def test_lossless_streams_must_name_32_lanes():
    b = bytearray(kc.encode(synthetic_kv(2, 24, 2, 64, seed=1), kc.CodecLevel.LOSSLESS))
    for v in (64, 128):
        b[33] = v
        with pytest.raises(kc.CodecError, match="lanes"):
            kc.decode(fix_checksums(bytes(b)))


def test_a_stream_read_with_another_lane_count_is_rejected_not_misread():
    x = synthetic_kv(2, 32, 4, 64, seed=2)
    for lanes, other in ((32, 64), (64, 32), (64, 128), (128, 64), (128, 32)):
        b = bytearray(kc.encode(x, kc.CodecLevel.DEFAULT, lanes=lanes))
        b[33] = other
        with pytest.raises(kc.CodecError):
            kc.decode(fix_checksums(bytes(b)))


@pytest.mark.parametrize("lanes", [64, 128])
def test_truncations_and_flips_of_wide_streams(lanes):
    b = kc.encode(synthetic_kv(2, 24, 4, 64, seed=6), kc.CodecLevel.DEFAULT, lanes=lanes)
    for n in list(range(0, 160)) + list(range(160, len(b), 53)):
        with pytest.raises(kc.CodecError):
            kc.decode(b[:n])
    rng = np.random.default_rng(lanes)
    for pos in rng.integers(64, len(b), 300):
        m = bytearray(b)
        m[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            kc.decode(fix_checksums(bytes(m)))
        except kc.CodecError as e:
            assert str(e)


def test_lane_table_entries_of_wide_streams_are_checked():
    x = synthetic_kv(1, 24, 4, 64, seed=8)  # 256 channels: 128 lanes
    b = kc.encode(x, kc.CodecLevel.DEFAULT, lanes=128)
    h = kc.info(b)
    po = h.payload_offset
    R = struct.unpack_from("<H", b, po)[0]
    table = po + 2 + R * (4 + 256 * 2) + 256 * 4
    for lane in (0, 31, 32, 127):
        m = bytearray(b)
        struct.pack_into("<I", m, table + 8 * lane + 4, 7)  # final state below L
        with pytest.raises(kc.CodecError, match="state"):
            kc.decode(fix_checksums(bytes(m)))
        m = bytearray(b)
        struct.pack_into("<I", m, table + 8 * lane, 0x7FFFFFFF)  # length past the segment
        with pytest.raises(kc.CodecError):
            kc.decode(fix_checksums(bytes(m)))


def test_encode_rejects_bad_lane_counts():
    x = synthetic_kv(1, 8, 2, 16)
    for bad in (0, 16, 48, 256, -32, True, 64.0, "64"):
        with pytest.raises(kc.CodecError, match="lanes"):
            kc.encode(x, kc.CodecLevel.DEFAULT, lanes=bad)
    with pytest.raises(kc.CodecError, match="lossless"):
        kc.encode(x, kc.CodecLevel.LOSSLESS, lanes=64)
    assert kc.info(kc.encode(x, kc.CodecLevel.LOSSLESS, lanes=32)).lanes == 32
