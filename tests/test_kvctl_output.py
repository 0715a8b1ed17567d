"""kvctl's output helpers: the JSON schema of protobuf messages and the TTY-only progress bar."""

from __future__ import annotations

import io

from kvstore.cli.kvctl_output import Progress, to_json
from kvstore_wire._proto.kvstore.v1 import admin_pb2, common_pb2


def test_schema_types():
    st = admin_pb2.GetStatsResponse(tiers=[admin_pb2.TierStats(tier=2, used_bytes=5, chunks=2**40)], version="v",
                                    write_queue_dropped=3)
    j = to_json(st)
    assert j["tiers"][0]["tier"] == "dram" and j["tiers"][0]["chunks"] == 2**40 and j["write_queue_dropped"] == 3
    e = to_json(admin_pb2.KeyEntry(namespace_id=b"\x01" * 32, key=b"\xab" * 32, tiers=[2, 3]))
    assert e["namespace_id"] == "01" * 32 and e["key"] == "ab" * 32 and e["tiers"] == ["dram", "disk"]
    assert e["encoding"] is None and e["pinned"] is False
    ns = to_json(common_pb2.NamespaceInfo(spec=common_pb2.NamespaceSpec(dtype=1)))
    assert ns["spec"]["dtype"] == "float16"
    assert to_json(admin_pb2.InspectResponse())["entry"] is None


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_only_on_a_terminal():
    quiet = io.StringIO()
    with Progress("x", 10, quiet) as p:
        p.update(10)
    assert quiet.getvalue() == ""
    tty = _Tty()
    with Progress("verifying", 4, tty) as p:
        p.update(4, note="0 corrupt")
    assert "verifying [" in tty.getvalue() and "4/4" in tty.getvalue() and tty.getvalue().endswith("\n")
