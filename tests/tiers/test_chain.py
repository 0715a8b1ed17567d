"""TierChain specifics: write-behind, promotion, durability, queue overflow, failing disk, pins,
presence, the Store's same-host commit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from kvstore import config as cfg
from kvstore.chain import build_chain
from kvstore.domain.errors import Unavailable
from kvstore.domain.results import PutResult
from kvstore.domain.types import Durability, Medium
from kvstore.tiers.faults import FaultyTier

from .conftest import BUDGET_BYTES, CHUNK_BYTES, chain_config, make_chunk, test_transcoder

MEM, PERSIST = Durability.MEMORY, Durability.PERSISTED


@pytest.fixture
def make_manager(tmp_path, clock):
    made = []

    def _make(config=None, disk_wrapper=None, **kw):
        wrap = {Medium.DISK: disk_wrapper} if disk_wrapper else None
        m = build_chain(config or chain_config(tmp_path / "disk"), test_transcoder(), clock, wrap=wrap, **kw)
        made.append(m)
        return m
    yield _make
    for m in made:
        m.close()


def _disk(chain):
    (lv,) = [lv for lv in chain.levels if lv.medium is Medium.DISK]
    return lv.tier


def test_write_behind_reaches_disk(make_manager, rng):
    m = make_manager()
    cid, meta, payload = make_chunk(rng)
    assert m.put(cid, meta, payload, MEM) is PutResult.STORED
    assert m.put(cid, meta, payload, MEM) is PutResult.EXISTED
    m.flush(timeout_s=10)
    assert _disk(m).contains(cid)
    assert m.inspect(cid).media == (Medium.DRAM, Medium.DISK)


def test_disk_hit_is_promoted_to_dram(make_manager, rng):
    m = make_manager()
    cid, meta, payload = make_chunk(rng)
    m.put(cid, meta, payload, MEM)
    m.flush(timeout_s=10)
    assert m.evict([cid], Medium.DRAM) == 1
    assert m.locate([cid]) == [Medium.DISK]
    with m.get(cid) as ref:
        assert ref.medium is Medium.DISK and bytes(ref.view) == payload.tobytes()
    assert m.locate([cid]) == [Medium.DRAM]


def test_lookup_returns_leading_run_and_pins_it(make_manager, rng, clock):
    m = make_manager()
    chunks = [make_chunk(rng) for _ in range(3)]
    for cid, meta, payload in chunks[:2]:
        m.put(cid, meta, payload, MEM)
    m.flush(timeout_s=10)
    m.evict([chunks[1][0]], Medium.DRAM)
    ids = [c for c, _, _ in chunks]
    assert m.lookup(ids, pin_ttl_s=5) == [Medium.DRAM, Medium.DISK]
    assert m.lookup([ids[2], ids[0]]) == []
    assert m.stats().pinned_chunks == 2
    assert m.evict() == 0                         # pinned: explicit eviction skips them
    clock.now += 6
    assert m.stats().pinned_chunks == 0
    assert m.evict() == 3                         # chunk 0 in DRAM and on disk, chunk 1 on disk


def test_persisted_put_survives_sigkill_without_flush(tmp_path, clock):
    path = tmp_path / "disk"
    script = textwrap.dedent("""
        import os, signal, sys, time
        sys.path.insert(0, sys.argv[2])
        import numpy as np
        from tiers.conftest import make_chunk, chain_config
        from kvstore.chain import build_chain
        from kvstore.domain.types import Durability
        m = build_chain(chain_config(sys.argv[1], fsync=True))
        cid, meta, payload = make_chunk(np.random.default_rng(7))
        m.put(cid, meta, payload, Durability.PERSISTED)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    rc = subprocess.run([sys.executable, "-c", script, str(path), os.path.dirname(os.path.dirname(__file__))]).returncode
    assert rc == -signal.SIGKILL
    import numpy as np
    cid, meta, payload = make_chunk(np.random.default_rng(7))
    with build_chain(chain_config(path), clock=clock) as m:
        assert m.locate([cid]) == [Medium.DISK]
        with m.get(cid) as ref:
            assert bytes(ref.view) == payload.tobytes()


def test_restart_serves_write_behind_chunks_after_close(make_manager, tmp_path, rng):
    m = make_manager()
    chunks = [make_chunk(rng) for _ in range(4)]
    for cid, meta, payload in chunks:
        m.put(cid, meta, payload, MEM)
    m.close()                                     # drains the queue
    m2 = make_manager()
    for cid, meta, payload in chunks:
        with m2.get(cid) as ref:
            assert bytes(ref.view) == payload.tobytes()


def test_queue_overflow_drops_and_counts(make_manager, tmp_path, rng):
    conf = cfg.Config(dram=cfg.DramConfig(capacity_bytes=BUDGET_BYTES, page_bytes=4096),
                      disk=cfg.DiskConfig(path=tmp_path / "disk", capacity_bytes=BUDGET_BYTES,
                                          fsync=False, write_queue_chunks=1))
    m = make_manager(conf, disk_wrapper=lambda d: FaultyTier(d, delay_s=0.3))
    for _ in range(5):
        cid, meta, payload = make_chunk(rng)
        assert m.put(cid, meta, payload, MEM) is PutResult.STORED
    s = m.stats()
    assert s.write_queue_dropped >= 3
    m.flush(timeout_s=10)
    assert m.stats().write_queue_depth == 0


def test_manager_survives_a_failing_disk(make_manager, rng):
    faulty = []
    m = make_manager(disk_wrapper=lambda d: faulty.append(FaultyTier(d, fail_put=1.0, fail_get=1.0)) or faulty[0])
    cid, meta, payload = make_chunk(rng)
    assert m.put(cid, meta, payload, MEM) is PutResult.STORED     # DRAM has it
    m.flush(timeout_s=10)
    assert m.stats().write_errors == 1
    with m.get(cid) as ref:
        assert bytes(ref.view) == payload.tobytes()
    cid2, meta2, payload2 = make_chunk(rng)
    with pytest.raises(Unavailable, match="persisted"):
        m.put(cid2, meta2, payload2, PERSIST)
    assert m.locate([cid2]) == [Medium.DRAM]
    # A disk read error is a counted miss, not an exception.
    faulty[0].fail_put = 0.0
    m.put(cid2, meta2, payload2, PERSIST)
    m.evict([cid2], Medium.DRAM)
    assert m.get(cid2) is None
    assert m.stats().read_errors == 1


def test_persisted_without_disk_is_unavailable(make_manager, tmp_path, rng):
    conf = cfg.Config(dram=cfg.DramConfig(capacity_bytes=BUDGET_BYTES, page_bytes=4096),
                      disk=cfg.DiskConfig(enabled=False, path=tmp_path / "unused"))
    m = make_manager(conf)
    cid, meta, payload = make_chunk(rng)
    with pytest.raises(Unavailable, match="disk.enabled"):
        m.put(cid, meta, payload, PERSIST)
    assert m.put(cid, meta, payload, MEM) is PutResult.STORED
    assert m.stats().tiers[0].medium is Medium.DRAM and len(m.stats().tiers) == 1


def test_delete_cancels_a_queued_write(make_manager, tmp_path, rng):
    conf = chain_config(tmp_path / "disk")
    gate = []
    m = make_manager(conf, disk_wrapper=lambda d: gate.append(FaultyTier(d, delay_s=0.2)) or gate[0])
    first = make_chunk(rng)
    victim = make_chunk(rng)
    m.put(*first, MEM)                             # occupies the writer for 0.2 s
    m.put(*victim, MEM)
    assert m.delete(victim[0])
    m.flush(timeout_s=10)
    assert m.locate([victim[0]]) == [None]
    assert _disk(m).contains(first[0])


def test_a_delete_during_the_copy_in_progress_does_not_leave_the_chunk_below(make_manager, tmp_path, rng):
    """A delete that arrives while the writer is copying that very chunk down waits for the
    copy, then removes it: the chunk is not found again (neither right after the delete nor
    once the queue is drained), so a deleted chunk is never read back from the lower tier."""
    import time

    class SlowPuts(FaultyTier):   # only the copy down is slow; deletes and reads are not
        def put(self, cid, meta, payload):
            time.sleep(0.4)
            return self.inner.put(cid, meta, payload)

    m = make_manager(chain_config(tmp_path / "disk"), disk_wrapper=SlowPuts)
    victim = make_chunk(rng)
    m.put(*victim, MEM)          # the writer takes it at once and spends 0.4 s before writing
    time.sleep(0.1)
    assert m.delete(victim[0])
    assert m.locate([victim[0]]) == [None]
    m.flush(timeout_s=10)
    assert m.locate([victim[0]]) == [None] and not _disk(m).contains(victim[0])


def test_entries_pages_in_id_order(make_manager, rng):
    m = make_manager()
    ids = sorted(make_chunk(rng)[0] for _ in range(5))
    for cid in ids:
        _, meta, payload = make_chunk(rng)
        m.put(cid, meta, payload, MEM)
    page1 = m.entries(limit=3)
    page2 = m.entries(after=page1[-1].cid, limit=3)
    assert [k.cid for k in page1 + page2] == ids
    assert m.inspect(ids[0]).pin_expires_s is None
    m.pin(ids[0])
    assert m.inspect(ids[0]).pin_expires_s == 0.0


def test_write_through_is_on_disk_when_put_returns(make_manager, tmp_path, rng):
    m = make_manager(chain_config(tmp_path / "disk", chain={"write_mode": "write-through"}))
    cid, meta, payload = make_chunk(rng)
    assert m.put(cid, meta, payload, MEM) is PutResult.STORED
    assert _disk(m).contains(cid)                 # no flush needed
    assert m.stats().write_queue_depth == 0


def test_no_promotion_when_the_policy_says_no(make_manager, tmp_path, rng):
    m = make_manager(chain_config(tmp_path / "disk", chain={"promote_on_hit": False}))
    cid, meta, payload = make_chunk(rng)
    m.put(cid, meta, payload, MEM)
    m.flush(timeout_s=10)
    m.evict([cid], Medium.DRAM)
    with m.get(cid) as ref:
        assert ref.medium is Medium.DISK
    assert m.locate([cid]) == [Medium.DISK]


def test_write_behind_byte_budget_skips_copies_instead_of_starving_dram(make_manager, tmp_path, rng):
    # A stalled disk: queued leases may hold at most half the arena, so foreground puts keep
    # finding room and the copies beyond the budget are skipped (counted), not failed.
    m = make_manager(chain_config(tmp_path / "disk", write_queue_chunks=1000),
                     disk_wrapper=lambda d: FaultyTier(d, delay_s=0.2))
    for _ in range(12):
        cid, meta, payload = make_chunk(rng)
        assert m.put(cid, meta, payload, MEM) is PutResult.STORED
    s = m.stats()
    assert s.write_queue_dropped >= 12 - (BUDGET_BYTES // 2) // CHUNK_BYTES - 1
    assert s.write_queue_depth <= (BUDGET_BYTES // 2) // CHUNK_BYTES


def test_pin_ttl_protects_then_expires(make_manager, rng, clock):
    m = make_manager()
    cid, meta, payload = make_chunk(rng)
    m.put(cid, meta, payload, MEM)
    m.flush(timeout_s=10)
    assert m.pin(cid, ttl_s=5)
    assert m.evict([cid]) == 0
    clock.now += 6
    assert m.evict([cid]) == 2                    # DRAM and disk copies
    assert not m.pin(cid)                         # absent chunks are not pinned


def test_presence_listener_sees_every_tier(make_manager, rng):
    events = []
    m = make_manager()
    m.set_listener(lambda cid, medium, present: events.append((cid, medium, present)))
    cid, meta, payload = make_chunk(rng)
    m.put(cid, meta, payload, MEM)
    m.flush(timeout_s=10)
    m.evict([cid], Medium.DRAM)
    assert events == [(cid, Medium.DRAM, True), (cid, Medium.DISK, True), (cid, Medium.DRAM, False)]


def test_codec_tier_in_the_chain_stores_bitstreams(make_manager, tmp_path, rng):
    from kvstore.domain.types import Encoding
    m = make_manager(chain_config(tmp_path / "disk", codec=cfg.TierCodec.LOSSLESS))
    cid, meta, payload = make_chunk(rng)
    m.put(cid, meta, payload, MEM)
    m.flush(timeout_s=10)
    with _disk(m).get(cid) as ref:
        assert ref.meta.encoding is Encoding.CODEC and ref.meta.payload_bytes < meta.payload_bytes
    m.evict([cid], Medium.DRAM)
    with m.get(cid) as ref:                       # promoted as stored: a bitstream
        assert ref.meta.encoding is Encoding.CODEC


def test_codec_without_a_transcoder_is_refused(tmp_path):
    from kvstore.domain.errors import FailedPrecondition
    with pytest.raises(FailedPrecondition, match="codec"):
        build_chain(chain_config(tmp_path / "disk", codec=cfg.TierCodec.LOSSLESS))


def test_unknown_tier_in_config_is_a_clear_error(tmp_path, monkeypatch):
    from kvstore.domain.errors import InvalidArgument
    from kvstore.tiers import registry
    monkeypatch.delitem(registry._REGISTRY, Medium.REMOTE)   # a build without that tier
    with pytest.raises(InvalidArgument, match="remote"):
        build_chain(chain_config(tmp_path / "disk", chain={"tiers": ["dram", "remote"]}))


def test_remote_listed_but_disabled_is_left_out(tmp_path):
    with build_chain(chain_config(tmp_path / "disk", chain={"tiers": ["dram", "disk", "remote"]})) as c:
        assert [lv.medium for lv in c.levels] == [Medium.DRAM, Medium.DISK] and not c.serves_prefixes


def test_chaos_a_flaky_disk_never_fails_memory_puts_or_serves_wrong_bytes(make_manager, rng):
    import random
    m = make_manager(disk_wrapper=lambda d: FaultyTier(d, fail_get=0.3, fail_put=0.3, rng=random.Random(7)))
    chunks = []
    for _ in range(30):                            # about four times the DRAM budget
        cid, meta, payload = make_chunk(rng)
        assert m.put(cid, meta, payload, MEM) is PutResult.STORED
        chunks.append((cid, payload.tobytes()))
    m.flush(timeout_s=30)
    served = 0
    for cid, want in chunks:
        ref = m.get(cid)
        if ref is not None:
            with ref:
                assert bytes(ref.view) == want
            served += 1
    s = m.stats()
    assert s.write_errors > 0 and served > 0
    assert all(t.used_bytes <= t.capacity_bytes for t in s.tiers)


def test_queued_copies_give_their_leases_back_rather_than_fail_a_put(make_manager, tmp_path, rng):
    # A budget of 90% of the arena and a stalled disk: the queued leases alone would leave no
    # room for the next put. The put must still succeed: the queue sheds (skips, counts).
    conf = chain_config(tmp_path / "disk", write_queue_chunks=1000, chain={"write_behind_fraction": 0.9})
    m = make_manager(conf, disk_wrapper=lambda d: FaultyTier(d, delay_s=0.5))
    readers = []
    for _ in range(2):                            # two chunks a reader keeps leased
        cid, meta, payload = make_chunk(rng)
        m.put(cid, meta, payload, MEM)
        readers.append(m.get(cid))
    m.flush(timeout_s=10)
    for _ in range(16):
        cid, meta, payload = make_chunk(rng)
        assert m.put(cid, meta, payload, MEM) is PutResult.STORED
        with m.get(cid) as ref:
            assert bytes(ref.view) == payload.tobytes()
    s = m.stats()
    assert s.write_queue_dropped >= 1
    for ref in readers:
        ref.release()
    m.flush(timeout_s=30)
    assert m.stats().write_queue_depth == 0


def test_a_full_arena_names_what_holds_it_and_the_key_to_raise(make_manager, rng):
    m = make_manager(chain_config("unused", chain={"tiers": ["dram"]}))
    held = []
    with pytest.raises(Exception) as e:
        for _ in range(20):
            cid, meta, payload = make_chunk(rng)
            m.put(cid, meta, payload, MEM)
            held.append(m.get(cid))               # readers keep every chunk leased
    msg = str(e.value)
    assert type(e.value).__name__ == "ResourceExhausted"
    assert "dram.capacity_bytes" in msg and "read leases" in msg and "pinned" not in msg.split("Held:")[0]
    for ref in held:
        ref.release()


def test_a_put_dram_has_no_room_for_is_stored_on_disk(make_manager, tmp_path, rng):
    # Readers hold every DRAM chunk: a MEMORY put spills to the disk tier instead of failing.
    m = make_manager(chain_config(tmp_path / "disk", chain={"write_mode": "write-through"}))
    held = []
    for _ in range(BUDGET_BYTES // CHUNK_BYTES):
        cid, meta, payload = make_chunk(rng)
        m.put(cid, meta, payload, MEM)
        held.append(m.get(cid))
    cid, meta, payload = make_chunk(rng)
    assert m.put(cid, meta, payload, MEM) is PutResult.STORED
    assert m.locate([cid]) == [Medium.DISK] and m.stats().spilled == 1
    for ref in held:
        ref.release()
    with m.get(cid) as ref:
        assert bytes(ref.view) == payload.tobytes()
