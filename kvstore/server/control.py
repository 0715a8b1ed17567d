"""The same-host control socket: LocalData's hot calls without gRPC's per-call cost.

A same-host engine's store or load of a few chunks is a copy of a few milliseconds around
one or two LocalData calls (ReserveWrite / CommitWrite, LeaseRead / Release). Through
grpc.aio each such call costs the daemon 0.5-2 ms of fixed work (HTTP/2 framing, the aio
server's thread hops), more than the copy of a small batch. This socket carries the same
request and response messages, answered by the same servicer methods with the same
checks, as length-prefixed frames on a unix socket beside the shared arena
(``<arena path>.ctl``, mode 0600 like the arena).

Frames (little-endian), both directions: ``u32 length`` (of what follows), ``u32 call id``,
``u8 code``, then the body. A request's code is its method (``METHODS``) and its body the
serialized request; a response's code is 0 and its body the serialized response, or a
gRPC status code with a UTF-8 message as body. Calls on one connection run concurrently
(at most ``MAX_INFLIGHT_PER_CONNECTION``; the daemon stops reading beyond that) and are
answered in completion order, matched by call id.

Authentication: the first frame must be ``HELLO`` (method 0) with the ticket an Attach over
gRPC returned (``AttachResponse.control_ticket``: 32 random bytes standing for that call's
principal), within ``HELLO_TIMEOUT_S``. Every later call is checked for its right as the
gRPC interceptor checks it and runs with that principal. Limits: ``server.max_message_bytes``
per frame (a larger one ends the connection with RESOURCE_EXHAUSTED), connections per tenant
(``quotas.max_control_connections``) and daemon-wide (``server.max_control_connections``),
tickets per tenant (``MAX_TICKETS_PER_TENANT``, oldest forgotten first).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import struct
import time
from pathlib import Path

import grpc

from kvstore_wire._proto.kvstore.v1 import local_pb2

from ..domain.errors import InvalidArgument, KVStoreError
from ..metrics import RequestStats
from ..quotas import QuotaLedger, Resource
from . import capabilities
from .auth import Principal, set_principal
from .status import BUG_MESSAGE, RateLimitedLog

log = logging.getLogger(__name__)
_events = RateLimitedLog(log)

HEADER = struct.Struct("<IIB")
#: Request codes: 0 is the HELLO that opens a connection, then the LocalData methods.
HELLO = 0
METHODS: dict[int, tuple[str, type, str]] = {
    1: ("ReserveWrite", local_pb2.ReserveWriteRequest, "reserve"),
    2: ("CommitWrite", local_pb2.CommitWriteRequest, "commit"),
    3: ("LeaseRead", local_pb2.LeaseReadRequest, "lease_read"),
    4: ("Release", local_pb2.ReleaseRequest, "release"),
}
#: Calls of one connection in flight at once; the daemon reads no further frame beyond that.
MAX_INFLIGHT_PER_CONNECTION = 64
#: Seconds a new connection has to send its HELLO.
HELLO_TIMEOUT_S = 5.0
#: Tickets remembered per tenant (one per Attach); the oldest is forgotten first.
MAX_TICKETS_PER_TENANT = 1024
TICKET_BYTES = 32
#: Seconds a client may leave answers unread before it is disconnected.
FLUSH_TIMEOUT_S = 30.0
_OK = 0


def _code_value(code: grpc.StatusCode) -> int:
    return code.value[0]


class ControlServer:
    """The daemon's control socket. Event-loop thread only (``start`` / ``stop`` / ``ticket``)."""

    def __init__(self, servicer, stats: RequestStats, quotas: QuotaLedger | None, max_frame_bytes: int,
                 max_connections: int) -> None:
        self._svc = servicer
        self._stats = stats
        self._quotas = quotas
        self._max_frame = max_frame_bytes
        self._max_connections = max_connections
        self._tickets: dict[bytes, Principal] = {}
        self._tickets_of: dict[str, collections.OrderedDict] = {}
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()
        self.path: Path | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()      # a stale socket of a daemon that was killed (the arena was recreated too)
        old = os.umask(0o177)  # the socket is created 0600 (the arena's mode): same user only
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(path), limit=64 * 1024)
        finally:
            os.umask(old)
        self.path = path

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    @property
    def running(self) -> bool:
        return self._server is not None

    def ticket(self, principal: Principal) -> bytes:
        """A new ticket standing for ``principal`` (the caller of an Attach)."""
        t = secrets.token_bytes(TICKET_BYTES)
        mine = self._tickets_of.setdefault(principal.tenant, collections.OrderedDict())
        while len(mine) >= MAX_TICKETS_PER_TENANT:
            old, _ = mine.popitem(last=False)
            self._tickets.pop(old, None)
        mine[t] = None
        self._tickets[t] = principal
        return t

    # ------------------------------------------------------------------ connections
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        tenant: str | None = None
        try:
            if len(self._conns) > self._max_connections:
                self._send(writer, 0, _code_value(grpc.StatusCode.RESOURCE_EXHAUSTED),
                           f"{self._max_connections} control-socket connections are open "
                           "(server.max_control_connections); use the gRPC calls or raise the limit")
                return
            try:
                got = await asyncio.wait_for(self._read_frame(reader, TICKET_BYTES + 64), HELLO_TIMEOUT_S)
            except asyncio.TimeoutError:
                self._send(writer, 0, _code_value(grpc.StatusCode.DEADLINE_EXCEEDED),
                           f"no HELLO within {HELLO_TIMEOUT_S:g} s")
                return
            except _TooLarge as e:
                self._send(writer, e.call_id, _code_value(grpc.StatusCode.INVALID_ARGUMENT),
                           "the first frame must be HELLO with the 32-byte control_ticket of an Attach")
                return
            if got is None:
                return
            call_id, code, body = got
            principal = self._tickets.get(bytes(body)) if code == HELLO else None
            if principal is None:
                self._send(writer, call_id, _code_value(grpc.StatusCode.UNAUTHENTICATED),
                           "the first frame must be HELLO with the control_ticket of an Attach of this daemon; "
                           "Attach again (the daemon may have restarted)")
                return
            if self._quotas is not None:
                try:
                    self._quotas.acquire(principal.tenant, Resource.CONTROL_CONNECTIONS)
                except KVStoreError as e:
                    self._send(writer, call_id, _code_value(grpc.StatusCode[e.code]), str(e))
                    return
                tenant = principal.tenant
            set_principal(principal)     # the call tasks below inherit it
            self._send(writer, call_id, _OK, b"")
            await self._calls(reader, writer, principal)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception as e:  # noqa: BLE001 - one connection's bug must not end the server
            _events.log(logging.ERROR, ("control-bug", type(e).__name__), "control-socket connection failed",
                        exc_info=e)
        finally:
            if tenant is not None:
                self._quotas.release(tenant, Resource.CONTROL_CONNECTIONS)
            with contextlib.suppress(Exception):
                writer.close()
            self._conns.discard(task)

    async def _read_frame(self, reader: asyncio.StreamReader, max_body: int):
        """``(call id, code, body)``, or None at a clean end of the stream; a frame over the
        limit is answered with RESOURCE_EXHAUSTED by raising ``_TooLarge``."""
        try:
            head = await reader.readexactly(HEADER.size)
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                return None
            raise
        length, call_id, code = HEADER.unpack(head)
        body_len = length - 5
        if length < 5 or body_len > max_body:
            raise _TooLarge(call_id, body_len)
        body = await reader.readexactly(body_len) if body_len else b""
        return call_id, code, body

    async def _calls(self, reader, writer, principal: Principal) -> None:
        room = asyncio.Semaphore(MAX_INFLIGHT_PER_CONNECTION)
        pending: set[asyncio.Task] = set()
        try:
            while True:
                await room.acquire()
                try:
                    got = await self._read_frame(reader, self._max_frame)
                except _TooLarge as e:
                    if e.nbytes < 0:
                        self._send(writer, e.call_id, _code_value(grpc.StatusCode.INVALID_ARGUMENT),
                                   f"a frame length of {e.nbytes + 5} is shorter than its call id and code (5 bytes)")
                    else:
                        self._send(writer, e.call_id, _code_value(grpc.StatusCode.RESOURCE_EXHAUSTED),
                                   f"a {e.nbytes}-byte control frame is over server.max_message_bytes="
                                   f"{self._max_frame}; send fewer keys per call")
                    return
                if got is None:
                    return
                t = asyncio.get_running_loop().create_task(self._call(writer, principal, *got))
                pending.add(t)
                t.add_done_callback(lambda t: (pending.discard(t), room.release()))
        finally:
            for t in pending:
                t.cancel()

    async def _call(self, writer, principal: Principal, call_id: int, code: int, body: bytes) -> None:
        t0 = time.perf_counter()
        method = METHODS.get(code)
        if method is None:
            self._send(writer, call_id, _code_value(grpc.StatusCode.UNIMPLEMENTED),
                       f"unknown control method {code}; known: " + ", ".join(f"{k} {m[0]}" for k, m in METHODS.items()))
            return
        name, request_cls, _ = method
        status = "OK"
        try:
            capabilities.check(f"/kvstore.v1.LocalData/{name}", principal.rights, unrestricted=not principal.authenticated)
            try:
                request = request_cls.FromString(body)
            except Exception:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeWarning, ValueError...
                _events.log(logging.WARNING, ("malformed-control", name), "malformed %s control frame (%d bytes)",
                            name, len(body))
                raise InvalidArgument(f"malformed {name} request: the bytes are not a valid message of this "
                                      "method") from None
            response = await getattr(self._svc, name)(request, None)
            self._send(writer, call_id, _OK, response.SerializeToString())
            await self._flush(writer)
        except KVStoreError as e:
            status = e.code
            self._send(writer, call_id, _code_value(grpc.StatusCode[e.code]), str(e))
            await self._flush(writer)
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception as e:  # noqa: BLE001 - the one mapping place for this transport
            status = "INTERNAL"
            _events.log(logging.ERROR, ("bug", name, type(e).__name__), "unexpected error in %s (control socket)",
                        name, exc_info=e)
            self._send(writer, call_id, _code_value(grpc.StatusCode.INTERNAL), BUG_MESSAGE.format(type(e).__name__))
        finally:
            self._stats.observe(name, status, time.perf_counter() - t0)

    async def _flush(self, writer: asyncio.StreamWriter) -> None:
        """Waits while the client has not read earlier answers (its call slot stays taken, so
        a client that reads nothing stops having its frames read); one that reads nothing
        for ``FLUSH_TIMEOUT_S`` is disconnected."""
        try:
            await asyncio.wait_for(writer.drain(), FLUSH_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError):
            writer.close()

    @staticmethod
    def _send(writer: asyncio.StreamWriter, call_id: int, code: int, body: bytes | str) -> None:
        if isinstance(body, str):
            body = body.encode()
        if writer.is_closing():
            return
        writer.write(HEADER.pack(len(body) + 5, call_id, code) + body)


class _TooLarge(Exception):
    def __init__(self, call_id: int, nbytes: int) -> None:
        super().__init__(nbytes)
        self.call_id = call_id
        self.nbytes = nbytes
