"""Disk tier specifics: restart, crash safety and corruption handling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import lmdb
import pytest

from kvstore.errors import FailedPrecondition, InvalidArgument
from kvstore.tiers.base import PinTable
from kvstore.tiers.disk import DiskTier, encode_header
from kvstore.types import ChunkMeta

from .conftest import BUDGET_BYTES, disk_config, make_chunk


@pytest.fixture
def open_disk(tmp_path, clock):
    opened = []

    def _open(**kw):
        t = DiskTier(disk_config(tmp_path / "disk", **kw), PinTable(clock), clock)
        opened.append(t)
        return t
    yield _open
    for t in opened:
        t.close()


def _files(tmp_path):
    return sorted(p for p in (tmp_path / "disk" / "chunks").rglob("*") if p.is_file())


def _read(t, cid):
    ref = t.get(cid)
    if ref is None:
        return None
    with ref:
        return bytes(ref.view)


def test_restart_serves_everything(open_disk, rng):
    t = open_disk(fsync=True)
    chunks = [make_chunk(rng) for _ in range(5)]
    for cid, meta, payload in chunks:
        assert t.put(cid, meta, payload)
    t.close()
    t2 = open_disk()
    assert t2.stats().chunks == 5
    for cid, meta, payload in chunks:
        assert _read(t2, cid) == payload.tobytes()
        assert next(t2.scan(cid)).meta == meta


def test_flipped_bytes_are_a_counted_miss_never_returned(open_disk, tmp_path, rng):
    t = open_disk()
    cid, meta, payload = make_chunk(rng)
    t.put(cid, meta, payload)
    f, = _files(tmp_path)
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert t.get(cid) is None
    assert t.stats().corrupt == 1
    assert not t.contains(cid) and _files(tmp_path) == []


def test_damaged_header_is_a_miss(open_disk, tmp_path, rng):
    t = open_disk()
    cid, meta, payload = make_chunk(rng)
    t.put(cid, meta, payload)
    f, = _files(tmp_path)
    with open(f, "r+b") as fh:
        fh.seek(10)
        fh.write(b"\x00\x01")
    assert t.get(cid) is None and t.stats().corrupt == 1


def test_truncated_file_is_a_miss(open_disk, tmp_path, rng):
    t = open_disk()
    cid, meta, payload = make_chunk(rng)
    t.put(cid, meta, payload)
    f, = _files(tmp_path)
    os.truncate(f, f.stat().st_size - 1000)
    assert t.get(cid) is None
    assert t.stats().corrupt == 1 and not t.contains(cid)


def test_index_entry_without_file_is_a_miss_and_cleaned_up(open_disk, tmp_path, rng):
    t = open_disk()
    cid, meta, payload = make_chunk(rng)
    t.put(cid, meta, payload)
    _files(tmp_path)[0].unlink()
    assert t.get(cid) is None
    assert not t.contains(cid)
    t.close()
    assert open_disk().stats().chunks == 0


def test_startup_adopts_orphans_and_removes_temp_and_torn_files(open_disk, tmp_path, rng):
    t = open_disk()
    t.close()
    shard = tmp_path / "disk" / "chunks"
    # A complete file whose index commit never happened (crash between rename and commit).
    cid, meta, payload = make_chunk(rng)
    (shard / cid.hex()[:2] / cid.hex()).write_bytes(encode_header(cid, meta) + payload.tobytes())
    # A torn orphan (short) and a temp file of an unfinished write.
    cid2, meta2, payload2 = make_chunk(rng)
    (shard / cid2.hex()[:2] / cid2.hex()).write_bytes((encode_header(cid2, meta2) + payload2.tobytes())[:5000])
    tmp = shard / "00" / ("00" * 64 + ".tmp.1.2")
    tmp.write_bytes(b"partial")
    t2 = open_disk()
    assert _read(t2, cid) == payload.tobytes()
    assert not t2.contains(cid2)
    assert not tmp.exists()
    assert len(_files(tmp_path)) == 1


def test_restart_over_a_smaller_budget_evicts(open_disk, rng):
    t = open_disk()
    for _ in range(6):
        cid, meta, payload = make_chunk(rng)
        t.put(cid, meta, payload)
    t.close()
    t2 = open_disk(capacity=BUDGET_BYTES // 2)
    s = t2.stats()
    assert s.used_bytes <= s.capacity_bytes and s.evictions > 0


def test_put_with_wrong_crc_is_refused(open_disk, rng):
    t = open_disk()
    cid, meta, payload = make_chunk(rng)
    bad = ChunkMeta(meta.num_tokens, meta.encoding, meta.payload_bytes, meta.crc32c ^ 1)
    with pytest.raises(InvalidArgument, match="CRC32C"):
        t.put(cid, bad, payload)
    assert not t.contains(cid)


def test_second_owner_of_a_directory_is_refused(open_disk):
    open_disk()
    with pytest.raises(FailedPrecondition, match="in use"):
        open_disk()


_WRITER = textwrap.dedent("""
    import sys, time, numpy as np
    from kvstore import config as cfg
    import kvstore_native as native
    from kvstore.tiers.base import PinTable
    from kvstore.tiers.disk import DiskTier
    from kvstore.types import ChunkId, ChunkMeta, Encoding
    t = DiskTier(cfg.DiskConfig(path=sys.argv[1], capacity_bytes=1 << 30, fsync=False), PinTable(time.time), time.time)
    for i in range(100000):
        data = np.random.default_rng(i).bytes(300_000 + i)
        cid = ChunkId(bytes(32) + i.to_bytes(32, "big"))
        t.put(cid, ChunkMeta(1, Encoding.RAW, len(data), native.crc32c(data)), data)
        print(i, flush=True)
""")


def test_sigkill_mid_burst_serves_every_acknowledged_chunk(tmp_path, clock):
    import numpy as np
    from kvstore.types import ChunkId
    path = tmp_path / "disk"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    acked = []
    for line in proc.stdout:
        acked.append(int(line))
        if len(acked) >= 40:
            break
    proc.send_signal(signal.SIGKILL)
    acked += [int(x) for x in proc.stdout.read().split()]
    proc.wait()
    t = DiskTier(disk_config(path, capacity=1 << 30), PinTable(clock), clock)
    try:
        for i in acked:
            ref = t.get(ChunkId(bytes(32) + i.to_bytes(32, "big")))
            assert ref is not None, f"acknowledged chunk {i} lost"
            with ref:
                assert bytes(ref.view) == np.random.default_rng(i).bytes(300_000 + i)
        assert t.stats().corrupt == 0
    finally:
        t.close()
