"""The benchmark's throttled link (``kvstore_testing.netns``): a namespace behind a veth pair
with tbf on both ends paces a raw transfer to the set rate, and leaves nothing behind; where
namespaces cannot be made (not root, no ``tc``) it says why and the benchmark falls back."""

from __future__ import annotations

import subprocess

import pytest

from kvstore_testing import netns


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.skipif(netns.available() is not None, reason=f"network namespaces: {netns.available()}")
def test_tbf_paces_the_link_and_close_removes_everything():
    try:
        link = netns.ThrottledNetns()
    except netns.NetnsUnavailable as e:
        pytest.skip(f"network namespaces unavailable here: {e}")
    name, dev = link.name, link.outer_dev
    try:
        assert name in _namespaces()
        link.set_rate(200e6)
        got = link.measure_bits_per_s(8 << 20)
        assert 0.5 * 200e6 < got < 1.3 * 200e6, got     # paced by the kernel, both directions
        link.unthrottle()
        assert link.measure_bits_per_s(32 << 20) > 2 * 200e6
    finally:
        link.close()
    assert name not in _namespaces()
    assert subprocess.run(["ip", "link", "show", dev], capture_output=True).returncode != 0
    link.close()  # idempotent


def test_unavailable_says_why(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert netns.available() == "not root"
    with pytest.raises(netns.NetnsUnavailable, match="not root"):
        netns.ThrottledNetns()
