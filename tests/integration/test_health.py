"""Standard health checking and reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def test_health_serving(daemon):
    with grpc.insecure_channel(daemon.addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for svc in ("", "kvstore.v1.KVStore", "kvstore.v1.Admin"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=svc)).status == \
                health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services(daemon):
    with grpc.insecure_channel(daemon.addr) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
    assert {"kvstore.v1.KVStore", "kvstore.v1.Admin", "grpc.health.v1.Health"} <= names
