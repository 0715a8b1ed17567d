"""Assembles the gRPC server: listeners, limits, interceptor, servicers, health, reflection.

``Daemon`` owns the ``Store`` (tiers, namespaces) and the worker pool; ``start()`` binds
every ``config.server.listen`` address, ``stop()`` drains in-flight RPCs for
``shutdown_grace_s`` and closes the store.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvstore_wire._proto.kvstore.v1 import admin_pb2_grpc, data_pb2, local_pb2_grpc
from kvstore_wire.channel import is_local_address

from ..config import Config
from ..domain.errors import FailedPrecondition, Unavailable
from ..metrics import KVStoreCollector, RequestStats, start_exporter
from ..store import Store
from . import wire
from .admin import AdminServicer
from .auth import Authenticator
from .control import ControlServer
from .data import DataServicer
from .local import LeaseTable, LocalDataServicer
from .status import RequestInterceptor
from .tls import check_tls_config, is_unix, server_credentials, verifies_client_certs

log = logging.getLogger(__name__)

DATA_SERVICE = "kvstore.v1.KVStore"
ADMIN_SERVICE = "kvstore.v1.Admin"
LOCAL_SERVICE = "kvstore.v1.LocalData"


def check_exposure(config: Config) -> None:
    """Refuses a non-loopback TCP listener without auth (unless explicitly allowed)."""
    if config.auth.enabled or config.auth.allow_insecure_remote:
        return
    remote = [a for a in config.server.listen if not is_local_address(a)]
    if remote:
        raise FailedPrecondition(
            f"refusing to listen on {', '.join(remote)} without authentication: configure auth.tokens or "
            "auth.tokens_file, listen on loopback / a unix socket, or set auth.allow_insecure_remote=true")


def _data_handler(svc: DataServicer) -> grpc.GenericRpcHandler:
    """Like the generated ``add_KVStoreServicer_to_server`` but with the hand-framed bulk
    messages of ``wire`` for Put (request) and Get (response)."""
    D = data_pb2
    handlers = {
        "RegisterNamespace": grpc.unary_unary_rpc_method_handler(
            svc.RegisterNamespace, D.RegisterNamespaceRequest.FromString, D.RegisterNamespaceResponse.SerializeToString),
        "Put": grpc.stream_unary_rpc_method_handler(
            svc.Put, wire.deserialize_put_request, D.PutResponse.SerializeToString),
        "Lookup": grpc.unary_unary_rpc_method_handler(
            svc.Lookup, D.LookupRequest.FromString, D.LookupResponse.SerializeToString),
        "Exists": grpc.unary_unary_rpc_method_handler(
            svc.Exists, D.ExistsRequest.FromString, D.ExistsResponse.SerializeToString),
        "Get": grpc.unary_stream_rpc_method_handler(
            svc.Get, D.GetRequest.FromString, wire.serialize_get_response),
        "Delete": grpc.unary_unary_rpc_method_handler(
            svc.Delete, D.DeleteRequest.FromString, D.DeleteResponse.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(DATA_SERVICE, handlers)


class Daemon:
    def __init__(self, config: Config, store: Store) -> None:
        check_exposure(config)
        check_tls_config(config)
        self.config = config
        self.store = store
        self.pool = ThreadPoolExecutor(config.server.worker_threads, thread_name_prefix="kvstore-worker")
        self.stats = RequestStats()
        self.health = health.aio.HealthServicer()
        self._metrics_server = None
        limit = config.server.max_message_bytes
        self.server = grpc.aio.server(
            interceptors=[RequestInterceptor(
                Authenticator(config.auth, trust_cert_identities=verifies_client_certs(config.server.tls)),
                self.stats, store.namespaces.quotas)],
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((_data_handler(DataServicer(store, config, self.pool, self.stats)),))
        self.leases = LeaseTable(store.local, config.server.lease_ttl_s, config.server.max_open_leases,
                                 limits=store.limits)
        self._sweeper: asyncio.Task | None = None
        self.local = LocalDataServicer(store, config, self.pool, self.leases)
        self.control = ControlServer(self.local, self.stats, store.namespaces.quotas, config.server.max_message_bytes,
                                     config.server.max_control_connections)
        self.local.control = self.control
        local_pb2_grpc.add_LocalDataServicer_to_server(self.local, self.server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(store, config, self.pool),
                                                   self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (DATA_SERVICE, ADMIN_SERVICE, LOCAL_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        tls = config.server.tls
        creds = server_credentials(tls) if tls.enabled else None
        for addr in config.server.listen:
            try:
                if creds is not None and not is_unix(addr):
                    port = self.server.add_secure_port(addr, creds)
                else:
                    port = self.server.add_insecure_port(addr)
            except RuntimeError as e:
                raise Unavailable(f"cannot listen on {addr}: {e} (is another daemon using it?)") from None
            if port == 0:
                raise Unavailable(f"cannot listen on {addr}: address in use or not permitted")

    async def start(self) -> None:
        await self.server.start()
        arena = self.store.local.arena_path
        if self.config.server.local_control and arena is not None:
            path = Path(f"{arena}.ctl")
            try:
                await self.control.start(path)
            except OSError as e:   # e.g. a path over the 107 bytes a unix socket name may have
                log.warning("no same-host control socket at %s (%s): same-host clients use gRPC for every call",
                            path, e)
        self._sweeper = asyncio.get_running_loop().create_task(self.leases.run_sweeper(), name="lease-sweeper")
        for name in ("", DATA_SERVICE, ADMIN_SERVICE, LOCAL_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._metrics_server = start_exporter(
            self.config.metrics.listen, KVStoreCollector(self.store.stats, self.stats), self.store.remote_status)

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.control.stop()
        await self.server.stop(self.config.server.shutdown_grace_s)
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.leases.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.store.close)
        self.pool.shutdown(wait=True)

    async def wait(self) -> None:
        await self.server.wait_for_termination()
