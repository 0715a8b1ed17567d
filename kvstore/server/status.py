"""The one place exceptions become gRPC status codes (and where auth, rights and request stats hook in).

``RequestInterceptor`` wraps every kvstore RPC handler so that, per call, in this order:
1. the request bytes are only *held* by the deserializer (``_Raw``): nothing is parsed before
   the caller is known, so an unauthenticated caller costs no parsing and gets UNAUTHENTICATED,
   never a parse error;
2. the caller is authenticated from its metadata and transport (``auth.Authenticator``), the
   method's right is checked (``capabilities.check``: one table for every RPC) and the
   principal becomes ``current_principal()`` for the servicer;
3. the request is parsed; malformed bytes end the call with INVALID_ARGUMENT and a short
   message (for streaming requests, each message as the servicer reads it);
4. a ``KVStoreError`` ends the call with ``grpc.StatusCode[error.code]`` and its message;
5. any other exception ends it with INTERNAL, after logging the traceback: that is a bug;
6. the outcome and latency are recorded in ``RequestStats``.

With a ``QuotaLedger``, streaming RPCs (Put, Get) also count against the tenant's
``quotas.max_concurrent_streams`` for their whole duration, and a streaming request that sends
nothing for ``quotas.max_stream_idle_s`` is ended with DEADLINE_EXCEEDED (what the servicer
held is freed as its ``async for`` unwinds); so is a response stream (Get) whose client reads
nothing for that long (each response is written with ``context.write`` under that timeout).

Nothing a client sends is logged more than once per ``LOG_INTERVAL_S`` per kind of event
(one line, with a count of the suppressed ones), so a client cannot flood the log.
Servicers therefore contain no try/except for error reporting; they raise ``kvstore.errors``.
Health checking and reflection are not intercepted (probes must work without a token).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable

import grpc

from ..domain.errors import DeadlineExceeded, InvalidArgument, KVStoreError
from ..metrics import RequestStats
from ..quotas import QuotaLedger, Resource
from . import capabilities
from .auth import ANONYMOUS, Authenticator, Peer, set_principal

log = logging.getLogger(__name__)

_KVSTORE_PREFIX = capabilities.KVSTORE_PREFIX
BUG_MESSAGE = ("internal error in the kvstore daemon ({}); this is a bug: please file it with the "
               "daemon log, which has the traceback")
#: Seconds between two log lines about the same kind of client-caused event.
LOG_INTERVAL_S = 10.0


class RateLimitedLog:
    """Logs an event of a given key at most once per ``interval_s``; the next line says how many
    were suppressed. Thread-safe (deserializers and handlers run on different threads)."""

    def __init__(self, logger: logging.Logger, interval_s: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[Any, float] = {}
        self._suppressed: dict[Any, int] = {}

    def log(self, level: int, key: Any, msg: str, *args, exc_info: BaseException | None = None) -> None:
        now = self._clock()
        with self._lock:
            if now - self._last.get(key, -self._interval_s) < self._interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            n = self._suppressed.pop(key, 0)
        suffix = f" ({n} more like it in the last {self._interval_s:.0f}s not logged)" if n else ""
        self._log.log(level, msg + suffix, *args, exc_info=exc_info)


_events = RateLimitedLog(log)


class _Raw:
    """What the deserializer hands gRPC: the request bytes, parsed only after authentication."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _hold(raw: bytes) -> _Raw:
    return _Raw(raw)


def _parser(deserializer: Callable[[bytes], Any] | None, short: str) -> Callable[[Any], Any]:
    """``_Raw`` -> request; malformed bytes -> InvalidArgument with a short message."""
    def parse(item: Any) -> Any:
        if not isinstance(item, _Raw):
            return item
        if deserializer is None:
            return item.data
        try:
            return deserializer(item.data)
        except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeWarning, ValueError...
            _events.log(logging.WARNING, ("malformed", short), "malformed %s request (%d bytes): %s",
                        short, len(item.data), type(e).__name__)
            raise InvalidArgument(f"malformed {short} request: the bytes are not a valid message of this "
                                  "method") from None
    return parse


def _aborted_code(context) -> str:
    """The status a handler aborted with (for the request counters)."""
    c = context.code()
    return c.name if isinstance(c, grpc.StatusCode) else "ABORTED_BY_HANDLER"


async def _fail(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> str:
    """Ends the call for ``exc``; returns the status code name it used."""
    if isinstance(exc, KVStoreError):
        await context.abort(grpc.StatusCode[exc.code], str(exc))
    _events.log(logging.ERROR, ("bug", method, type(exc).__name__), "unexpected error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, BUG_MESSAGE.format(type(exc).__name__))
    return "INTERNAL"  # not reached: abort raises


def _peer(context) -> Peer:
    return Peer.from_grpc(context.peer() or "", context.auth_context())


class RequestInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator, stats: RequestStats, quotas: QuotaLedger | None = None) -> None:
        self._auth = authenticator
        self._stats = stats
        self._quotas = quotas

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        method = details.method
        if handler is None or not capabilities.is_kvstore_method(method):
            return handler
        short = method[len(_KVSTORE_PREFIX):]
        metadata = details.invocation_metadata
        auth, stats, quotas = self._auth, self._stats, self._quotas
        parse = _parser(handler.request_deserializer, short)
        streaming = bool(handler.stream_unary or handler.unary_stream)

        def begin(context) -> str | None:
            """Authenticates and checks the right; returns the tenant holding a stream slot, if any."""
            p = auth.authenticate(metadata, _peer(context)) if auth.enabled else ANONYMOUS
            capabilities.check(method, p.rights, unrestricted=not p.authenticated)
            set_principal(p)
            if streaming and quotas is not None:
                quotas.acquire(p.tenant, Resource.CONCURRENT_STREAMS)
                return p.tenant
            return None

        def end(stream_tenant: str | None) -> None:
            if stream_tenant is not None:
                quotas.release(stream_tenant, Resource.CONCURRENT_STREAMS)

        def idle_s(tenant: str | None) -> float | None:
            return quotas.limits(tenant).max_stream_idle_s if quotas is not None and tenant is not None else None

        def code_of(exc: BaseException) -> str:
            return exc.code if isinstance(exc, KVStoreError) else "INTERNAL"

        async def parsed_stream(request_iterator, timeout_s: float | None):
            it = request_iterator.__aiter__()
            while True:
                try:
                    item = await asyncio.wait_for(it.__anext__(), timeout_s)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(f"{short}: no request message for {timeout_s:g}s "
                                           "(quotas.max_stream_idle_s); the stream is cancelled") from None
                yield parse(item)

        def single_response(inner, streaming_request: bool):
            """Wraps a handler that returns one response (unary-unary and stream-unary alike:
            the first argument is the request or the request iterator)."""
            async def call(request_or_iterator, context):
                t0 = time.perf_counter()
                code = "OK"
                held = None
                try:
                    held = begin(context)
                    req = (parsed_stream(request_or_iterator, idle_s(held)) if streaming_request
                           else parse(request_or_iterator))
                    return await inner(req, context)
                except grpc.aio.AbortError:
                    code = _aborted_code(context)
                    raise
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                except Exception as e:  # noqa: BLE001 - the one mapping place
                    code = code_of(e)
                    await _fail(context, e, method)
                finally:
                    end(held)
                    stats.observe(short, code, time.perf_counter() - t0)
            return call

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(single_response(handler.unary_unary, False),
                                                       _hold, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(single_response(handler.stream_unary, True),
                                                        _hold, handler.response_serializer)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request, context):
                t0 = time.perf_counter()
                code = "OK"
                held = None
                try:
                    held = begin(context)
                    timeout_s = idle_s(held)
                    responses = inner_us(parse(request), context)
                    try:
                        async for item in responses:
                            try:
                                await asyncio.wait_for(context.write(item), timeout_s)
                            except asyncio.TimeoutError:
                                raise DeadlineExceeded(
                                    f"{short}: the client read nothing for {timeout_s:g}s "
                                    "(quotas.max_stream_idle_s); the stream is cancelled") from None
                    finally:
                        await responses.aclose()  # the servicer's finally blocks run now, not at GC
                except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
                    code = "CANCELLED"
                    raise
                except Exception as e:  # noqa: BLE001
                    code = code_of(e)
                    await _fail(context, e, method)
                finally:
                    end(held)
                    stats.observe(short, code, time.perf_counter() - t0)

            return grpc.unary_stream_rpc_method_handler(unary_stream, _hold, handler.response_serializer)
        # No bidirectional RPCs in v1: a kvstore method of another shape is denied, not served unchecked.
        return _denied_handler(method)


def _denied_handler(method: str):
    async def deny(request, context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not served by this daemon")
    return grpc.unary_unary_rpc_method_handler(deny, _hold, None)
