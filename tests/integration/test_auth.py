"""Bearer-token auth: tenant from the token, admin RPCs need an admin token."""

from __future__ import annotations

import grpc
import pytest

from kvstore_client import KVStoreClient
from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc, data_pb2, data_pb2_grpc
from kvstore_client.errors import NotFound, Unauthenticated

from .helpers import ADMIN_TOKEN, TOKENS
from .helpers import smol_ns, tokens_for

ALICE, BOB = [t for t, e in TOKENS.items() if not e["admin"]]


def _md(tok):
    return (("authorization", f"Bearer {tok}"),)


def test_no_token_and_bad_token(auth_daemon):
    with pytest.raises(Unauthenticated, match="missing credentials"):
        KVStoreClient(auth_daemon.addr, smol_ns("auth"))
    with pytest.raises(Unauthenticated, match="invalid token"):
        KVStoreClient(auth_daemon.addr, smol_ns("auth"), token="not-a-real-token-at-all")
    with grpc.insecure_channel(auth_daemon.addr) as ch:
        with pytest.raises(grpc.RpcError) as e:
            admin_pb2_grpc.AdminStub(ch).GetStats(admin_pb2.GetStatsRequest())
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_admin_needs_admin_token(auth_daemon):
    with grpc.insecure_channel(auth_daemon.addr) as ch:
        stub = admin_pb2_grpc.AdminStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetStats(admin_pb2.GetStatsRequest(), metadata=_md(ALICE))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "admin" in e.value.details()
        assert stub.GetStats(admin_pb2.GetStatsRequest(), metadata=_md(ADMIN_TOKEN)).version


def test_tenant_comes_from_token_and_foreign_ids_are_not_found(auth_daemon):
    with KVStoreClient(auth_daemon.addr, smol_ns("auth2"), token=ALICE) as a:
        assert a.namespace.tenant == "alice"
        alice_id = a.namespace_id
    with KVStoreClient(auth_daemon.addr, smol_ns("auth2"), token=BOB) as b:
        b.namespace_id = alice_id  # try to use alice's namespace id directly
        with pytest.raises(NotFound, match="not registered for this tenant"):
            b.lookup(tokens_for(256))
