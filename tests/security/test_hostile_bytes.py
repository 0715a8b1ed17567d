"""Malformed request bytes to every method: INVALID_ARGUMENT (or a clean refusal), never UNKNOWN,
INTERNAL or a traceback; without a token: UNAUTHENTICATED before any parsing (issue 8, finding 3)."""

from __future__ import annotations

import os

import grpc

from kvstore_wire._proto.kvstore.v1 import data_pb2

from .conftest import ROOT, all_methods, md, raw_call

_VALID = data_pb2.LookupRequest(namespace_id=b"n" * 32, keys=[b"k" * 32] * 4).SerializeToString()

PAYLOADS = {
    "random": os.urandom(512),
    "random-small": bytes(range(256))[::7],
    "truncated": _VALID[: len(_VALID) // 2],
    "wrong-wire-type": b"\x0d\x01\x02\x03\x04\x08\x01\x10\x05",   # fixed32 / varint where messages/bytes go
    "huge-varint": b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    "huge-length": b"\x0a\xff\xff\xff\xff\x0f",
    "put-frame-huge-varint": b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01xx",
    "put-frame-truncated": b"\x12\x80\x80\x10abc",
    "deep-nesting": b"\x0a\x80\x01" + b"\x0a\x7e" * 64,
}
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


def test_garbage_to_every_method(sec_daemon):
    seen_invalid = set()
    with grpc.insecure_channel(sec_daemon.addr) as ch:
        for method, cs, ss in all_methods():
            for name, payload in PAYLOADS.items():
                code, details = raw_call(ch, method, cs, ss, payload, md(None))
                assert code == grpc.StatusCode.UNAUTHENTICATED, (method, name, code, details)
                code, details = raw_call(ch, method, cs, ss, payload, md(ROOT))
                assert code not in FORBIDDEN, (method, name, code, details)
                assert "Traceback" not in details and "bug" not in details, details
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    seen_invalid.add(method)
                    assert len(details) < 300, details
    assert len(seen_invalid) == len(all_methods()), set(m[0] for m in all_methods()) - seen_invalid
    # Still healthy and serving; the log has no traceback and at most a few rate-limited lines.
    sec_daemon.wait_serving()
    with grpc.insecure_channel(sec_daemon.addr) as ch:
        code, details = raw_call(ch, "/kvstore.v1.Admin/GetStats", False, False, b"", md(ROOT))
        assert code == grpc.StatusCode.OK, details
    log = sec_daemon.log()
    assert "Traceback" not in log
    assert "this is a bug" not in log
    assert log.count("malformed") <= 2 * len(all_methods())


def test_put_stream_of_garbage_after_a_valid_first_message(sec_daemon):
    with grpc.insecure_channel(sec_daemon.addr) as ch:
        call = ch.stream_unary("/kvstore.v1.KVStore/Put")
        for tail in PAYLOADS.values():
            try:
                call(iter([b"", tail, tail]), metadata=md(ROOT), timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            assert code not in FORBIDDEN, code
    assert "Traceback" not in sec_daemon.log()
