"""The GPU path's request and commit splits (pure functions of kvstore_client.gpu_state; no GPU)."""

import pytest

from kvstore_client.gpu_state import _groups, commit_groups

MiB = 1 << 20


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 16, 17, 64, 100])
@pytest.mark.parametrize("size", [1, 5898240, 33554432, 1 << 30])
@pytest.mark.parametrize("tail", [0, 1, 8 * MiB, 16 * MiB, 64 * MiB, 1 << 40])
def test_commit_groups_cover_the_slots_in_shrinking_groups_no_smaller_than_the_tail(n, size, tail):
    groups = commit_groups(n, size, tail)
    assert groups[0][0] == 0 and groups[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    sizes = [hi - lo for lo, hi in groups]
    assert all(s > 0 for s in sizes)
    assert sizes == sorted(sizes, reverse=True)
    least = -(-tail // size) if tail else n
    if tail == 0 or n <= least:
        assert sizes == [n]
    else:
        assert min(sizes) >= min(least, n)
        assert sizes[0] >= -(-n // 2)


def test_commit_groups_examples():
    smol, llama = 5898240, 33554432
    assert [hi - lo for lo, hi in commit_groups(16, smol, 16 * MiB)] == [8, 4, 4]
    assert [hi - lo for lo, hi in commit_groups(16, llama, 16 * MiB)] == [8, 4, 2, 1, 1]
    assert commit_groups(16, smol, 0) == [(0, 16)]
    assert commit_groups(0, smol, 16 * MiB) == []


def test_request_groups():
    assert _groups(16, 2) == [(0, 2), (2, 16)]
    assert _groups(16, 2, 2) == [(0, 2), (2, 6), (6, 14), (14, 16)]
    assert _groups(1, 2) == [(0, 1)]
