"""Every RPC needs a right, checked in one place before its handler runs (issue 8, finding 1)."""

from __future__ import annotations

import grpc
import pytest

from kvstore.errors import PermissionDenied
from kvstore.server import capabilities
from kvstore.server.capabilities import METHOD_RIGHTS, Right
from kvstore_wire._proto.kvstore.v1 import local_pb2

from .conftest import ALICE, BOB, ENGINE, OPS, ROOT, all_methods, md, raw_call

LOCAL = [m for m in all_methods() if m[0].startswith("/kvstore.v1.LocalData/")]
ADMIN = [m for m in all_methods() if m[0].startswith("/kvstore.v1.Admin/")]


def test_every_proto_method_is_in_the_table():
    assert {m[0] for m in all_methods()} == set(METHOD_RIGHTS)
    assert {m for m, r in METHOD_RIGHTS.items() if r is Right.LOCAL_PATH} == {m[0] for m in LOCAL}
    assert len(LOCAL) == 5


def test_unknown_kvstore_method_is_denied():
    with pytest.raises(PermissionDenied, match="capability table"):
        capabilities.check("/kvstore.v1.KVStore/Sneaky", frozenset(Right))
    capabilities.check("/kvstore.v1.KVStore/Sneaky", frozenset(), unrestricted=True)  # auth off


@pytest.mark.parametrize("token", [ALICE, BOB, OPS])
def test_local_data_rpcs_need_local_path(sec_daemon, token):
    with grpc.insecure_channel(sec_daemon.addr) as ch:
        for method, cs, ss in LOCAL:
            code, details = raw_call(ch, method, cs, ss, b"", md(token))
            assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code, details)
            assert "'local_path' right" in details, details


def test_reserve_commit_by_stream_token_cannot_publish(sec_daemon):
    """The attack of finding 1: reserve then commit with a stream-only token."""
    with grpc.insecure_channel(sec_daemon.addr) as ch:
        reserve = ch.unary_unary("/kvstore.v1.LocalData/ReserveWrite", local_pb2.ReserveWriteRequest.SerializeToString,
                                 local_pb2.ReserveWriteResponse.FromString)
        commit = ch.unary_unary("/kvstore.v1.LocalData/CommitWrite", local_pb2.CommitWriteRequest.SerializeToString,
                                local_pb2.CommitWriteResponse.FromString)
        for call, req in ((reserve, local_pb2.ReserveWriteRequest()), (commit, local_pb2.CommitWriteRequest())):
            with pytest.raises(grpc.RpcError) as e:
                call(req, metadata=md(ALICE), timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_local_path_token_passes_the_check(sec_daemon):
    with grpc.insecure_channel(sec_daemon.addr) as ch:
        code, details = raw_call(ch, "/kvstore.v1.LocalData/Attach", False, False, b"", md(ENGINE))
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION), details  # private arena: FP


@pytest.mark.parametrize("token", [ALICE, ENGINE])
def test_admin_rpcs_need_admin(sec_daemon, token):
    with grpc.insecure_channel(sec_daemon.addr) as ch:
        for method, cs, ss in ADMIN:
            code, details = raw_call(ch, method, cs, ss, b"", md(token))
            assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code, details)
            assert "admin = true" in details


def test_admin_token_passes(sec_daemon):
    with grpc.insecure_channel(sec_daemon.addr) as ch:
        code, details = raw_call(ch, "/kvstore.v1.Admin/GetStats", False, False, b"", md(OPS))
        assert code == grpc.StatusCode.OK, details


def test_no_token_is_unauthenticated_everywhere(sec_daemon):
    with grpc.insecure_channel(sec_daemon.addr) as ch:
        for method, cs, ss in all_methods():
            code, details = raw_call(ch, method, cs, ss, b"\xff\xff garbage", md(None))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, code, details)
            code, _ = raw_call(ch, method, cs, ss, b"", md("not-a-valid-token-at-all-xxxx"))
            assert code == grpc.StatusCode.UNAUTHENTICATED, method
        assert ROOT  # (ROOT is used by the hostile-bytes tests)
