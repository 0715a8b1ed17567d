"""The steps a client plan yields, and the RPC table both front ends bind.

A *plan* (see ``_core``) is a generator that does all the client's logic and asks its front
end, by yielding one of the steps below, for what only the front end can do: run an RPC
(blocking in ``KVStoreClient``, awaited in ``AsyncKVStoreClient``) or run memory work
(inline in the sync client, on a worker thread in the async one so the event loop never
stalls on a copy). The front end sends the step's result back into the plan, or throws the
step's exception into it, so ``try``/``finally`` in a plan always runs where it is written.

Contract for plan authors:
- a plan never blocks on I/O itself; every RPC is a yielded step;
- ``Work`` functions touch only memory (arena views, numpy, native copies, CUDA copies on a
  stream they are given): they may run on any thread;
- ``Stream.feed`` runs on the front end's thread for each message; it must be cheap per
  message (it copies one received piece into place).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from kvstore_wire._proto.kvstore.v1 import data_pb2, local_pb2
from kvstore_wire.channel import TlsOptions, auth_metadata, is_local_address, open_channel
from kvstore_wire.framing import data_or_message, serializer

#: Largest message the client accepts (Get pieces are ``server.stream_piece_bytes``).
CLIENT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

_SVC = "/kvstore.v1.KVStore/"
_LOCAL = "/kvstore.v1.LocalData/"
_D, _L = data_pb2, local_pb2

#: name -> (kind, full method, request serializer, response deserializer). ``kind`` picks the
#: channel factory: unary_unary, unary_stream or stream_unary.
RPCS: dict[str, tuple[str, str, Callable, Callable]] = {
    "register": ("unary_unary", _SVC + "RegisterNamespace", _D.RegisterNamespaceRequest.SerializeToString,
                 _D.RegisterNamespaceResponse.FromString),
    "put": ("stream_unary", _SVC + "Put", serializer, _D.PutResponse.FromString),
    "lookup": ("unary_unary", _SVC + "Lookup", _D.LookupRequest.SerializeToString, _D.LookupResponse.FromString),
    "exists": ("unary_unary", _SVC + "Exists", _D.ExistsRequest.SerializeToString, _D.ExistsResponse.FromString),
    "get": ("unary_stream", _SVC + "Get", _D.GetRequest.SerializeToString,
            functools.partial(data_or_message, message_cls=_D.GetResponse)),
    "delete": ("unary_unary", _SVC + "Delete", _D.DeleteRequest.SerializeToString, _D.DeleteResponse.FromString),
    "attach": ("unary_unary", _LOCAL + "Attach", _L.AttachRequest.SerializeToString, _L.AttachResponse.FromString),
    "lease_read": ("unary_unary", _LOCAL + "LeaseRead", _L.LeaseReadRequest.SerializeToString,
                   _L.LeaseReadResponse.FromString),
    "reserve": ("unary_unary", _LOCAL + "ReserveWrite", _L.ReserveWriteRequest.SerializeToString,
                _L.ReserveWriteResponse.FromString),
    "commit": ("unary_unary", _LOCAL + "CommitWrite", _L.CommitWriteRequest.SerializeToString,
               _L.CommitWriteResponse.FromString),
    "release": ("unary_unary", _LOCAL + "Release", _L.ReleaseRequest.SerializeToString, _L.ReleaseResponse.FromString),
}


#: Longest wait between attempts to reach a same-host daemon (loopback or unix socket) again
#: after it went away. gRPC's default backoff grows to 120 s, so an engine whose sidecar
#: restarted could fail fast on every call for minutes; on the same host an attempt costs a
#: refused connect, so a restarted daemon is reached within this long.
LOCAL_RECONNECT_BACKOFF_MS = 250


def channel_options(addr: str = "") -> list[tuple[str, int]]:
    opts = [("grpc.max_receive_message_length", CLIENT_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", CLIENT_MAX_MESSAGE_BYTES)]
    if addr and is_local_address(addr):
        opts += [("grpc.initial_reconnect_backoff_ms", LOCAL_RECONNECT_BACKOFF_MS),
                 ("grpc.min_reconnect_backoff_ms", LOCAL_RECONNECT_BACKOFF_MS),
                 ("grpc.max_reconnect_backoff_ms", LOCAL_RECONNECT_BACKOFF_MS)]
    return opts


def open_client_channel(addr: str, token: str | None, tls: TlsOptions | None, aio: bool = False):
    """(call metadata, channel) for ``addr``: TLS when ``tls`` is given; the token only over
    TLS, a unix socket or loopback (``kvstore_client.errors.InvalidArgument`` otherwise)."""
    from .errors import InvalidArgument

    try:
        return auth_metadata(token, addr, tls), open_channel(addr, tls=tls, options=channel_options(addr), aio=aio)
    except ValueError as e:  # InsecureTransportError, unreadable PEM files
        raise InvalidArgument(str(e)) from None


def bind_stubs(channel) -> dict[str, Callable]:
    """The RPC callables of ``RPCS`` on a sync or an aio channel alike."""
    return {name: getattr(channel, kind)(method, request_serializer=ser, response_deserializer=de)
            for name, (kind, method, ser, de) in RPCS.items()}


@dataclass(frozen=True, slots=True)
class Call:
    """A unary RPC; the plan receives its response (or the ``grpc.RpcError`` thrown in)."""
    rpc: str
    request: Any


@dataclass(frozen=True, slots=True)
class Stream:
    """A server-streaming RPC whose messages go to ``feed`` until it returns False (the
    front end then cancels the call). The plan receives None."""
    rpc: str
    request: Any
    feed: Callable[[Any], bool]


@dataclass(frozen=True, slots=True)
class Upload:
    """A client-streaming RPC sending ``messages`` (pre-serialised); the plan receives the response."""
    rpc: str
    messages: Iterable[Any]


@dataclass(frozen=True, slots=True)
class Work:
    """Memory-only work ``fn(*args)``; the plan receives its return value."""
    fn: Callable[..., Any]
    args: tuple = ()


Step = Call | Stream | Upload | Work
