"""Index damage of every kind found in issue 9: the tier opens, rebuilds the index from the
chunk files, serves every intact chunk and never a corrupt one. Real files, real LMDB."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvstore.tiers.base import PinTable
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.disk_recovery import index_problem

from .conftest import disk_config, make_chunk

N_CHUNKS = 6
PAGE = 4096


def _open(tmp_path, clock, **kw):
    return DiskTier(disk_config(tmp_path / "disk", **kw), PinTable(clock), clock)


def _fill(tmp_path, clock, rng, n=N_CHUNKS, **kw):
    t = _open(tmp_path, clock, **kw)
    chunks = [make_chunk(rng) for _ in range(n)]
    for cid, meta, payload in chunks:
        assert t.put(cid, meta, payload)
    t.close()
    return chunks


def _data(tmp_path):
    return tmp_path / "disk" / "index.lmdb" / "data.mdb"


def _flip(f, at, n=64):
    b = bytearray(f.read_bytes())
    for i in range(at, min(at + n, len(b))):
        b[i] ^= 0xFF
    f.write_bytes(bytes(b))


def _damage(kind, f, rng):
    size = f.stat().st_size
    if kind == "flipped_meta":
        _flip(f, 16, 32)
    elif kind == "flipped_both_metas":
        _flip(f, 16, 32)
        _flip(f, PAGE + 16, 32)
    elif kind == "flipped_data_pages":
        for at in range(2 * PAGE, size, PAGE):
            _flip(f, at, 48)
    elif kind == "zeroed_meta_pages":
        b = bytearray(f.read_bytes())
        b[:2 * PAGE] = bytes(2 * PAGE)
        f.write_bytes(bytes(b))
    elif kind == "truncated_half":
        os.truncate(f, size // 2)
    elif kind == "truncated_odd":
        os.truncate(f, size - 100)
    elif kind == "empty":
        os.truncate(f, 0)
    elif kind == "random_contents":
        f.write_bytes(rng.bytes(size))
    elif kind == "version_mismatch":
        b = bytearray(f.read_bytes())
        for page in (0, PAGE):
            b[page + 20:page + 24] = (999).to_bytes(4, "little")
        f.write_bytes(bytes(b))
    elif kind == "not_a_directory":
        d = f.parent
        for x in d.iterdir():
            x.unlink()
        d.rmdir()
        d.write_bytes(b"garbage")
    else:
        raise AssertionError(kind)


KINDS = ["flipped_meta", "flipped_both_metas", "flipped_data_pages", "zeroed_meta_pages", "truncated_half",
         "truncated_odd", "empty", "random_contents", "version_mismatch", "not_a_directory"]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_index_is_rebuilt(tmp_path, clock, rng, kind):
    chunks = _fill(tmp_path, clock, rng)
    # one damaged chunk file too: it must not come back
    bad_cid = chunks[0][0]
    bad = tmp_path / "disk" / "chunks" / bad_cid.hex()[:2] / bad_cid.hex()
    _flip(bad, bad.stat().st_size - 200, 8)
    _damage(kind, _data(tmp_path), rng)
    t = _open(tmp_path, clock)
    try:
        if kind not in ("flipped_data_pages",):   # may or may not hit live pages
            assert t.recovery.rebuilt, t.recovery
        for cid, meta, payload in chunks[1:]:
            ref = t.get(cid)
            assert ref is not None, f"intact chunk lost after {kind}"
            with ref:
                assert bytes(ref.view) == payload.tobytes()
        assert t.get(bad_cid) is None
        assert t.stats().corrupt >= 1
    finally:
        t.close()
    assert index_problem(tmp_path / "disk" / "index.lmdb", 2) is None
    t = _open(tmp_path, clock)       # the rebuilt index opens cleanly
    assert not t.recovery.rebuilt and t.stats().chunks == N_CHUNKS - 1
    t.close()


def test_full_index_map_grows(tmp_path, clock, rng):
    from kvstore import config as cfg
    conf = cfg.DiskConfig(path=tmp_path / "disk", capacity_bytes=64 * 1024**2, fsync=False,
                          index_map_bytes=64 * 1024)
    t = DiskTier(conf, PinTable(clock), clock)
    small = [make_chunk(rng, tokens=1) for _ in range(600)]
    for cid, meta, payload in small:
        assert t.put(cid, meta, payload)
    assert t.stats().chunks == len(small)
    t.close()
    t = DiskTier(conf, PinTable(clock), clock)
    assert not t.recovery.rebuilt and t.stats().chunks == len(small)
    t.close()


def test_orphan_files_are_reindexed_and_counted(tmp_path, clock, rng):
    chunks = _fill(tmp_path, clock, rng)
    idx = tmp_path / "disk" / "index.lmdb"
    for f in idx.iterdir():
        f.unlink()
    idx.rmdir()
    junk = tmp_path / "disk" / "chunks" / "ab" / ("ab" + "00" * 63)
    junk.write_bytes(b"not a chunk")
    t = _open(tmp_path, clock)
    try:
        r = t.recovery
        assert r.adopted == N_CHUNKS and r.quarantined == 1 and not junk.exists()
        assert r.chunks == N_CHUNKS and r.bytes == t.stats().used_bytes
        assert all(t.contains(c) for c, _, _ in chunks)
    finally:
        t.close()


def test_scrub_finds_cold_corruption(tmp_path, clock, rng):
    chunks = _fill(tmp_path, clock, rng)
    cid = chunks[2][0]
    f = tmp_path / "disk" / "chunks" / cid.hex()[:2] / cid.hex()
    _flip(f, f.stat().st_size // 2, 4)
    t = _open(tmp_path, clock)
    try:
        seen = []
        r = t.scrub(progress=seen.append)
        assert (r.checked, r.corrupt, r.done) == (N_CHUNKS, 1, True) and seen[-1].done
        assert not t.contains(cid) and not f.exists()
        assert t.stats().corrupt == 1 and t.stats().misses == 0
    finally:
        t.close()


def test_background_scrubber(tmp_path, clock, rng):
    from kvstore.tiers.scrubber import Scrubber
    chunks = _fill(tmp_path, clock, rng)
    cid = chunks[1][0]
    f = tmp_path / "disk" / "chunks" / cid.hex()[:2] / cid.hex()
    _flip(f, f.stat().st_size // 2, 4)
    t = _open(tmp_path, clock, scrub_bytes_per_s=0)
    s = Scrubber(t, 1 << 30, clock, first_delay_s=0, rest_s=0.05)
    s.start()
    try:
        import time
        deadline = time.monotonic() + 10
        while t.contains(cid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not t.contains(cid) and s.corrupt == 1
    finally:
        s.stop()
        t.close()
