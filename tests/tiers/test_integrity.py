"""DRAM integrity in the chain: a bit flipped in the arena is never served. The corrupt copy
is dropped and counted, the tier below serves its good copy (and promotes it back up), and
with no copy below the chunk is a miss. Real tiers: a real arena and a real disk directory;
the flip is written straight into the arena's memory, as a stray write or failing RAM would."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.chain import build_chain
from kvstore.domain.types import Durability, Medium

from .conftest import LOSSLESS, chain_config, make_chunk, test_transcoder

MEM = Durability.MEMORY


@pytest.fixture
def make_chain(tmp_path, clock):
    made = []

    def _make(**kw):
        c = build_chain(chain_config(tmp_path / "disk", **kw), test_transcoder(), clock)
        made.append(c)
        return c
    yield _make
    for c in made:
        c.close()


def _dram(chain):
    return chain.levels[0].tier


def _arena_tier(chain):
    """The DramTier itself (under a CodecTier wrapper when the DRAM tier has a codec)."""
    t = _dram(chain)
    return getattr(t, "inner", t)


def flip_bit(chain, cid, at: float = 0.5) -> None:
    """Flips one bit of ``cid``'s payload in the DRAM arena (``at``: where, as a fraction)."""
    dram = _arena_tier(chain)
    off, n = dram.locate(cid)
    view = dram._arena.writable(off, n)
    try:
        view[int(n * at)] ^= 0x10
    finally:
        view.release()


def _bytes(ref) -> bytes:
    return bytes(ref.view)


@pytest.mark.parametrize("at", [0.0, 0.5, 0.999999])
def test_a_flipped_dram_bit_is_never_served_and_the_disk_copy_is(make_chain, rng, at):
    chain = make_chain(chain={"write_mode": "write-through"})
    cid, meta, payload = make_chunk(rng)
    chain.put(cid, meta, payload, MEM)
    assert _dram(chain).contains(cid) and chain.levels[1].tier.contains(cid)
    flip_bit(chain, cid, at)

    with chain.get(cid) as ref:
        assert ref.medium == Medium.DISK                # the corrupt DRAM copy was not used
        assert _bytes(ref) == payload.tobytes()
    dram_stats = _dram(chain).stats()
    assert dram_stats.corrupt == 1
    # Promoted again from the good copy: the next read is a verified DRAM hit.
    with chain.get(cid) as ref:
        assert ref.medium == Medium.DRAM and _bytes(ref) == payload.tobytes()
    assert _dram(chain).stats().corrupt == 1
    assert chain.stats().tiers[0].corrupt == 1          # what Admin.Stats and the exporter read


def test_with_no_copy_below_a_flipped_chunk_is_a_miss_and_is_dropped(make_chain, rng):
    chain = make_chain(chain={"tiers": ["dram"]})
    cid, meta, payload = make_chunk(rng)
    other, ometa, opayload = make_chunk(rng)
    chain.put(cid, meta, payload, MEM)
    chain.put(other, ometa, opayload, MEM)
    flip_bit(chain, cid)
    assert chain.get(cid) is None
    assert not chain.levels[0].tier.contains(cid) and chain.lookup([cid]) == []
    assert chain.levels[0].tier.stats().corrupt == 1
    with chain.get(other) as ref:                       # its neighbour is untouched
        assert _bytes(ref) == opayload.tobytes()


def test_a_dropped_copy_frees_its_pages_and_a_new_put_stores_it_again(make_chain, rng):
    chain = make_chain(chain={"tiers": ["dram"]})
    cid, meta, payload = make_chunk(rng)
    chain.put(cid, meta, payload, MEM)
    used = _dram(chain).stats().used_bytes
    flip_bit(chain, cid)
    assert chain.get(cid) is None
    assert _dram(chain).stats().used_bytes < used
    chain.put(cid, meta, payload, MEM)
    with chain.get(cid) as ref:
        assert _bytes(ref) == payload.tobytes()


def test_a_flip_in_a_codec_dram_tier_falls_back_to_disk(make_chain, rng):
    chain = make_chain(dram_codec=LOSSLESS, chain={"write_mode": "write-through"})
    cid, meta, payload = make_chunk(rng)
    chain.put(cid, meta, payload, MEM)
    flip_bit(chain, cid)
    with chain.get(cid) as ref:
        assert ref.medium == Medium.DISK
    assert _arena_tier(chain).stats().corrupt == 1


def test_a_leased_copy_stays_readable_while_a_corrupt_one_is_dropped(make_chain, rng):
    """Dropping a corrupt copy only unlinks it: a lease taken before the flip (without a
    check: write-behind's ``peek``) keeps its pages until it is released."""
    chain = make_chain(chain={"tiers": ["dram"]})
    cid, meta, payload = make_chunk(rng)
    chain.put(cid, meta, payload, MEM)
    held = _dram(chain).peek(cid)
    flip_bit(chain, cid)
    assert chain.get(cid) is None
    assert np.frombuffer(held.view, np.uint8).size == meta.payload_bytes
    held.release()
    assert _dram(chain).stats().used_bytes == 0
