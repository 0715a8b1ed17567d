"""Recomputes tests/vectors/keys_v1.json from docs/keys.md with an independent implementation,
and checks kvstore_wire.keys against the same vectors."""

import hashlib
import json
from pathlib import Path

import pytest

from kvstore_wire.keys import Namespace, chunk_key, prefix_keys, root_key

VECTORS = json.loads((Path(__file__).parent / "vectors" / "keys_v1.json").read_text())


def spec_h(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def spec_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return len(b).to_bytes(4, "little") + b


def spec_ns_bytes(ns: dict) -> bytes:
    # Straight from the table in docs/keys.md.
    return (b"kvstore.ns.v1\x00" + spec_str(ns["model"]) + bytes([ns["dtype"]])
            + b"".join(ns[f].to_bytes(4, "little") for f in ("num_layers", "num_kv_heads", "head_dim"))
            + bytes([ns["layout"]])
            + b"".join(ns[f].to_bytes(4, "little") for f in ("tp_rank", "tp_size", "chunk_tokens"))
            + spec_str(ns["tenant"]))


def spec_tokens(toks) -> bytes:
    return b"".join(t.to_bytes(4, "little") for t in toks)


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: f"{c['namespace']['model'][:20]}-{len(c['tokens'])}")
def test_vectors_recomputed_from_spec(case):
    ns = case["namespace"]
    nb = spec_ns_bytes(ns)
    assert nb.hex() == case["namespace_bytes_hex"]
    nid = spec_h(nb)
    assert nid.hex() == case["namespace_id"]
    key = spec_h(b"kvstore.prefix.v1\x00" + nid)
    assert key.hex() == case["root_key"]
    toks, c = case["tokens"], ns["chunk_tokens"]
    chained = []
    for start in range(0, len(toks), c):
        chunk = toks[start:start + c]
        key = spec_h(key + len(chunk).to_bytes(4, "little") + spec_tokens(chunk))
        chained.append(key.hex())
    assert chained == case["prefix_keys_with_partial"]
    assert chained[: len(toks) // c] == case["prefix_keys"]
    first = toks[:c]
    assert spec_h(b"kvstore.chunk.v1\x00" + nid + len(first).to_bytes(4, "little") + spec_tokens(first)).hex() \
        == case["chunk_key_of_first_chunk"]


def _native_or_skip():
    """kvstore_native with its library loaded, or the test skipped."""
    native = pytest.importorskip("kvstore_native")
    try:
        native.lib()
    except native.NativeLibraryMissing as e:
        pytest.skip(f"kvstore-native not built: {e}")
    return native


@pytest.fixture(params=["python", "native"])
def chain(request, monkeypatch):
    """Each prefix-key chain of kvstore_wire.keys: hashlib's, and kvstore-native's
    ``kvs_prefix_keys`` (the one used where the library loads)."""
    import kvstore_wire.keys as keys

    if request.param == "python":
        monkeypatch.setattr(keys, "_native_chain", None)
    else:
        monkeypatch.setattr(keys, "_native_chain", _native_or_skip().prefix_keys)
    return request.param


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: f"{c['namespace']['model'][:20]}-{len(c['tokens'])}")
def test_client_implementation_matches_vectors(case, chain):
    ns = Namespace(**case["namespace"])
    nid = ns.namespace_id
    assert nid.hex() == case["namespace_id"]
    assert root_key(nid).hex() == case["root_key"]
    assert [k.hex() for k in prefix_keys(nid, case["tokens"], ns.chunk_tokens)] == case["prefix_keys"]
    assert [k.hex() for k in prefix_keys(nid, case["tokens"], ns.chunk_tokens, include_partial=True)] \
        == case["prefix_keys_with_partial"]
    assert chunk_key(nid, case["tokens"][: ns.chunk_tokens]).hex() == case["chunk_key_of_first_chunk"]


def test_every_namespace_field_changes_the_id():
    base = dict(model="m", dtype=1, num_layers=2, num_kv_heads=2, head_dim=8, layout=1,
                tp_rank=0, tp_size=2, chunk_tokens=16, tenant="a")
    ids = {Namespace(**base).namespace_id}
    for field, other in [("model", "m2"), ("dtype", 2), ("num_layers", 3), ("num_kv_heads", 1),
                         ("head_dim", 16), ("tp_rank", 1), ("tp_size", 4), ("chunk_tokens", 32),
                         ("tenant", "b")]:
        ids.add(Namespace(**{**base, field: other}).namespace_id)
    ids.add(Namespace(**{**base, "layout": 2, "num_kv_heads": 1}).namespace_id)
    assert len(ids) == 11


def test_prefix_key_depends_on_everything_before():
    nid = Namespace(model="m", dtype=1, num_layers=1, num_kv_heads=1, head_dim=8, chunk_tokens=4).namespace_id
    a = prefix_keys(nid, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = prefix_keys(nid, [1, 2, 3, 9, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]
    # The same second chunk after a different first chunk is a different prefix key, but the
    # same position-independent chunk key.
    assert chunk_key(nid, [5, 6, 7, 8]) == chunk_key(nid, [5, 6, 7, 8])
    assert chunk_key(nid, [5, 6, 7, 8]) not in (a[1], b[1])


@pytest.mark.parametrize("bad", [[-1], [2**32], [1.5]])
def test_bad_tokens_rejected(bad):
    nid = bytes(32)
    with pytest.raises((ValueError, TypeError)):
        prefix_keys(nid, bad, 1)


def test_bad_namespace_rejected():
    with pytest.raises(ValueError, match="num_layers"):
        Namespace(model="m", dtype="fp16", num_layers=0, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="unknown KV dtype"):
        Namespace(model="m", dtype="int3", num_layers=1, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="tp_rank"):
        Namespace(model="m", dtype="fp16", num_layers=1, num_kv_heads=1, head_dim=8, tp_rank=2, tp_size=2)


@pytest.mark.parametrize("n,chunk,partial", [(0, 4, False), (7, 4, False), (7, 4, True), (1024, 256, False), (1000, 16, True)])
def test_prefix_keys_same_for_every_token_container(n, chunk, partial, chain):
    """A list, a tuple, an iterator and integer numpy arrays of the same ids give the same keys
    (the numpy form is packed whole, the others element by element)."""
    import numpy as np

    ns = Namespace(model="m", dtype="float16", num_layers=2, num_kv_heads=2, head_dim=8).namespace_id
    ids = [(i * 2654435761) % (1 << 32) for i in range(n)]
    want = prefix_keys(ns, ids, chunk, include_partial=partial)
    assert len(want) == (-(-n // chunk) if partial else n // chunk)
    for form in (tuple(ids), iter(ids), np.array(ids, dtype=np.uint32), np.array(ids, dtype=np.int64),
                 np.array(ids, dtype=np.uint64)):
        assert prefix_keys(ns, form, chunk, include_partial=partial) == want


@pytest.mark.parametrize("bad", [[-1], [1 << 32], "np-negative", "np-large", "np-2d"])
def test_bad_token_arrays_rejected(bad):
    import numpy as np

    arr = {"np-negative": np.array([3, -1]), "np-large": np.array([1 << 32], dtype=np.int64),
           "np-2d": np.zeros((2, 2), dtype=np.int32)}.get(bad, bad) if isinstance(bad, str) else bad
    ns = Namespace(model="m", dtype="float16", num_layers=2, num_kv_heads=2, head_dim=8).namespace_id
    with pytest.raises(ValueError, match="token ids must"):
        prefix_keys(ns, arr, 1)


@pytest.mark.parametrize("container", ["list", "numpy"])
def test_lazy_prefix_keys_hash_only_what_is_read(container, chain):
    """``PrefixKeys`` gives ``prefix_keys``'s keys in any order of access, hashing only up to
    the furthest chunk read (what lets the GPU path overlap hashing with its copies)."""
    import numpy as np

    from kvstore_wire.keys import PrefixKeys

    ns = Namespace(model="m", dtype="float16", num_layers=2, num_kv_heads=2, head_dim=8).namespace_id
    ids = [(i * 40503) % 50000 for i in range(16 * 37 + 5)]
    want = prefix_keys(ns, ids, 16)
    toks = ids if container == "list" else np.array(ids, dtype=np.int32)
    k = PrefixKeys(ns, toks, 16)
    assert len(k) == 37 and k.computed() == 0
    assert k[0] == want[0] and k.computed() == 1
    assert k[2:5] == want[2:5] and k.computed() == 5
    assert k[3] == want[3] and k.computed() == 5
    assert k[-1] == want[-1] and k.computed() == 37
    assert list(k) == want and k[:] == want and k[::-3] == want[::-3]
    with pytest.raises(IndexError):
        k[37]
    lazy = PrefixKeys(ns, toks, 16)
    assert [key for key in lazy] == want   # iteration alone, from nothing hashed
    partial = PrefixKeys(ns, toks, 16, include_partial=True)
    assert len(partial) == 38 and list(partial) == prefix_keys(ns, ids, 16, include_partial=True)


def test_lazy_prefix_keys_reject_a_bad_id_when_its_chunk_is_reached(chain):
    from kvstore_wire.keys import PrefixKeys

    ns = bytes(32)
    k = PrefixKeys(ns, [1, 2, 3, 4, -5, 6], 2)
    assert k[:2] == prefix_keys(ns, [1, 2, 3, 4], 2)
    with pytest.raises(ValueError, match="token ids must"):
        k[2]


def test_native_blake2b_is_hashlibs_for_every_block_boundary():
    """kvs_blake2b256 against hashlib for every length around the 128-byte block edges (the
    last block is finalized even when the message fills it) and a long random message."""
    import os

    native = _native_or_skip()
    for n in [*range(0, 300), 383, 384, 385, 1024 + 36, 1 << 20]:
        data = os.urandom(n)
        assert native.blake2b256(data) == hashlib.blake2b(data, digest_size=32).digest(), n


def test_native_chain_rejects_bad_arguments():
    native = _native_or_skip()
    with pytest.raises(ValueError, match="32-byte"):
        native.prefix_keys(b"short", b"\0" * 8, 2)
    with pytest.raises(ValueError, match="whole u32"):
        native.prefix_keys(bytes(32), b"\0" * 7, 2)
    with pytest.raises(ValueError, match="chunk_tokens"):
        native.prefix_keys(bytes(32), b"\0" * 8, 0)
    assert native.prefix_keys(bytes(32), b"", 4) == b""
