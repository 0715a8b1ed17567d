"""Small units of the boundary: the rate-limited event log and the registry log's corruption check."""

from __future__ import annotations

import logging

import pytest

from kvstore.errors import InvalidArgument
from kvstore.registry_log import RegistryLog
from kvstore.server.status import RateLimitedLog


def test_rate_limited_log_one_line_per_interval(caplog):
    rl = RateLimitedLog(logging.getLogger("kvstore.test.rl"), interval_s=60)
    with caplog.at_level(logging.WARNING, logger="kvstore.test.rl"):
        for _ in range(1000):
            rl.log(logging.WARNING, "k", "hostile event")
        rl.log(logging.WARNING, "other", "another kind")
    assert [r.getMessage() for r in caplog.records] == ["hostile event", "another kind"]


def test_rate_limited_log_reports_suppressed_count(caplog):
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("kvstore.test.rl2"), interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="kvstore.test.rl2"):
        for _ in range(3):
            rl.log(logging.WARNING, "k", "e")
        now[0] = 10.5
        rl.log(logging.WARNING, "k", "e")
    assert len(caplog.records) == 2
    assert "2 more like it" in caplog.records[-1].getMessage()


def test_registry_log_corruption_in_the_middle_is_refused(tmp_path):
    path = tmp_path / "r.log"
    log = RegistryLog(path)
    log.load()
    for i in range(3):
        log.sync(log.append({"op": "add", "i": i}))
    log.close()
    lines = path.read_bytes().split(b"\n")
    lines[2] = b"{not json"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(InvalidArgument, match="corrupt at line 3"):
        RegistryLog(path).load()


def test_registry_log_group_commit_covers_earlier_appends(tmp_path):
    log = RegistryLog(tmp_path / "r.log")
    log.load()
    seqs = [log.append({"i": i}) for i in range(10)]
    log.sync(seqs[-1])
    assert log._synced == 10
    log.sync(seqs[3])  # already durable: returns without another fsync
    log.close()
    assert [r["i"] for r in RegistryLog(tmp_path / "r.log").load()] == list(range(10))
