"""The presence index: writer and reader agree; overflow sends readers to the daemon."""

import mmap
import os

from kvstore_wire.presence import PresenceReader, PresenceWriter, fastest, layout, tier_bit
from kvstore_wire.types import Tier


def make(tmp_path, nbuckets=4):
    path = tmp_path / "idx"
    size = layout(nbuckets)[2]
    path.write_bytes(bytes(size))
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, size)
    os.close(fd)
    nonce = os.urandom(16)
    w = PresenceWriter(memoryview(mm), nbuckets, nonce)
    r = PresenceReader.open(str(path), nonce)
    return w, r, mm


def key(i: int, bucket: int = 0) -> bytes:
    # bytes 8..16 pick the bucket; bytes 0..8 make the tag (its low 8 bits are dropped)
    return ((i + 1) << 8).to_bytes(8, "little") + bucket.to_bytes(8, "little") + bytes(16)


def test_bits_set_and_clear_per_medium(tmp_path):
    w, r, _ = make(tmp_path)
    ns = os.urandom(32)
    k = key(5, 2)
    assert r.probe(ns, k) == 0
    w.update(ns, k, tier_bit(Tier.DISK), True)
    assert fastest(r.probe(ns, k)) == Tier.DISK
    w.update(ns, k, tier_bit(Tier.DRAM), True)
    assert fastest(r.probe(ns, k)) == Tier.DRAM
    w.update(ns, k, tier_bit(Tier.DRAM), False)
    assert fastest(r.probe(ns, k)) == Tier.DISK
    w.update(ns, k, tier_bit(Tier.DISK), False)
    assert r.probe(ns, k) == 0
    # Another namespace never sees it.
    w.update(ns, k, tier_bit(Tier.DRAM), True)
    assert r.probe(os.urandom(32), k) == 0


def test_full_bucket_overflows_to_unknown_not_to_a_false_miss(tmp_path):
    w, r, _ = make(tmp_path)
    ns = bytes(32)
    keys = [key(i, 1) for i in range(9)]           # 9 chunks, one bucket of 8 slots
    for k in keys:
        w.update(ns, k, tier_bit(Tier.DRAM), True)
    assert all(r.probe(ns, k) for k in keys[:8])
    assert r.probe(ns, keys[8]) is None              # not indexed: the reader must ask
    assert r.probe(ns, key(100, 1)) is None          # nor can it rule anything out in that bucket
    assert r.probe(ns, key(100, 3)) == 0             # other buckets are unaffected


def test_reader_refuses_a_foreign_index(tmp_path):
    _, r, _ = make(tmp_path)
    assert PresenceReader.open(str(tmp_path / "idx"), os.urandom(16)) is None
    assert PresenceReader.open(str(tmp_path / "missing"), os.urandom(16)) is None
