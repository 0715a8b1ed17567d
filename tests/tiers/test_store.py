"""The Store facade over a real chain: checksums, codec conversion, the same-host path."""

from __future__ import annotations

import pytest

import kvstore_native as native
from kvstore import config as cfg
from kvstore.domain.chunks import ChunkHeader, validate_header
from kvstore.domain.errors import DataLoss, FailedPrecondition, InvalidArgument, Unavailable
from kvstore.domain.results import PutResult
from kvstore.domain.types import ChunkId, Durability, Encoding, Medium
from kvstore.store import Store

from .conftest import TEST_CHUNK_TOKENS, TEST_NAMESPACE, chain_config, make_chunk

MEM, PERSIST = Durability.MEMORY, Durability.PERSISTED


@pytest.fixture
def open_store(tmp_path, clock):
    made = []

    def _open(**kw):
        conf = chain_config(tmp_path / "disk", **kw)
        s = Store.open(conf, clock)
        made.append(s)
        return s, s.namespaces.register(TEST_NAMESPACE).namespace_id
    yield _open
    for s in made:
        s.close()


def _chunk(rng, nid):
    cid, meta, payload = make_chunk(rng, nid)
    return cid, meta, memoryview(payload).cast("B")


def test_put_checks_the_crc_and_stores_nothing_on_a_mismatch(open_store, rng):
    store, nid = open_store()
    cid, meta, payload = _chunk(rng, nid)
    bad = meta.with_payload(meta.encoding, meta.payload_bytes, meta.crc32c ^ 1)
    with pytest.raises(DataLoss, match="Nothing was stored"):
        store.put(cid, bad, payload, MEM, where="chunk 0")
    assert store.locate([cid]) == [None]
    nocrc = meta.with_payload(meta.encoding, meta.payload_bytes, 0)
    assert store.put(cid, nocrc, payload, MEM) is PutResult.STORED
    with store.get(cid) as ref:
        assert ref.meta.crc32c == meta.crc32c     # filled in by the store
    assert store.lookup([cid]).matched == 1


def test_read_as_converts_both_ways(open_store, rng):
    store, nid = open_store(dram_codec=cfg.TierCodec.LOSSLESS)
    cid, meta, payload = _chunk(rng, nid)
    store.put(cid, meta, payload, MEM)
    with store.get(cid) as ref:
        assert ref.meta.encoding is Encoding.CODEC
        m, view = store.read_as(ref, Encoding.RAW)
        assert m.encoding is Encoding.RAW and bytes(view) == bytes(payload)
        assert native.crc32c(view) == m.crc32c
        m2, view2 = store.read_as(ref, Encoding.CODEC)
        assert view2 is ref.view


def test_one_header_check_for_both_paths(open_store):
    store, nid = open_store()
    info = store.namespace(nid, None)
    ok = ChunkHeader(b"\x01" * 32, TEST_CHUNK_TOKENS, TEST_NAMESPACE.chunk_bytes(TEST_CHUNK_TOKENS))
    cid, meta = validate_header(info, ok, 1 << 30, "chunk 0")
    assert cid == ChunkId(nid + ok.key) and meta.encoding is Encoding.RAW
    for bad, why in [(ChunkHeader(b"short", 1, 1), "32-byte"),
                     (ChunkHeader(ok.key, 0, 1), "num_tokens"),
                     (ChunkHeader(ok.key, 1, 7), "shape"),
                     (ChunkHeader(ok.key, 1, 10**9, encoding=int(Encoding.CODEC)), "max_chunk_bytes"),
                     (ChunkHeader(ok.key, 1, 7, encoding=99), "chunk 0")]:
        with pytest.raises(InvalidArgument, match=why):
            validate_header(info, bad, 1 << 20, "chunk 0")


def test_local_commit_goes_down_the_chain(open_store, rng):
    store, nid = open_store()
    local = store.local
    assert local.attach().index_path is not None
    cid, meta, payload = _chunk(rng, nid)
    res = local.reserve(cid, meta.payload_bytes)
    res.view[:] = payload
    assert local.commit(res, meta, MEM) is PutResult.STORED
    assert local.reserve(cid, meta.payload_bytes) is None        # stored: nothing to write
    store.flush(timeout_s=10)
    assert store.inspect(cid).media == (Medium.DRAM, Medium.DISK)
    # A chunk only on disk is promoted into the arena for a local read.
    store.evict([cid], Medium.DRAM)
    (got,) = local.lease_run([cid])
    with got.ref:
        assert got.found_in is Medium.DISK and bytes(got.ref.view) == bytes(payload)
    assert store.locate([cid]) == [Medium.DRAM]


def test_local_persisted_commit_is_on_disk_before_it_is_visible(open_store, rng):
    store, nid = open_store(chain={"write_mode": "write-behind"})
    cid, meta, payload = _chunk(rng, nid)
    res = store.local.reserve(cid, meta.payload_bytes)
    res.view[:] = payload
    store.local.commit(res, meta, PERSIST)
    assert store.inspect(cid).media == (Medium.DRAM, Medium.DISK)


def test_local_commit_into_a_codec_arena_stores_the_bitstream(open_store, rng):
    store, nid = open_store(dram_codec=cfg.TierCodec.LOSSLESS)
    cid, meta, payload = _chunk(rng, nid)
    res = store.local.reserve(cid, meta.payload_bytes)
    res.view[:] = payload
    store.local.commit(res, meta, MEM)
    with store.get(cid) as ref:
        assert ref.meta.encoding is Encoding.CODEC
        assert bytes(store.read_as(ref, Encoding.RAW)[1]) == bytes(payload)


def test_persisted_without_a_durable_tier(open_store, rng):
    store, nid = open_store(chain={"tiers": ["dram"]})
    cid, meta, payload = _chunk(rng, nid)
    with pytest.raises(Unavailable, match="durable tier"):
        store.put(cid, meta, payload, PERSIST)
    res = store.local.reserve(cid, meta.payload_bytes)
    with pytest.raises(Unavailable):
        store.local.commit(res, meta, PERSIST)
    assert store.local.reserve(cid, meta.payload_bytes) is not None   # the failed commit gave its pages back


def test_private_arena_has_no_local_access(tmp_path):
    from .conftest import dram_config
    conf = cfg.Config(dram=dram_config(shm_name=""), disk=cfg.DiskConfig(enabled=False, path=tmp_path / "ns"))
    with Store.open(conf) as private:
        with pytest.raises(FailedPrecondition, match="private"):
            private.local.attach()
