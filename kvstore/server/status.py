"""The one place exceptions become gRPC status codes (and where auth and request stats hook in).

``RequestInterceptor`` wraps every kvstore RPC handler so that, per call:
1. the caller is authenticated from its metadata (``auth.Authenticator``) and becomes the
   ``current_principal()`` for the servicer; Admin methods also require an admin token;
2. a ``KVStoreError`` ends the call with ``grpc.StatusCode[error.code]`` and its message;
3. any other exception ends it with INTERNAL, after logging the traceback: that is a bug;
4. the outcome and latency are recorded in ``RequestStats``.

Servicers therefore contain no try/except for error reporting; they raise ``kvstore.errors``.
Health checking and reflection are not intercepted (probes must work without a token).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from ..domain.errors import KVStoreError
from ..metrics import RequestStats
from .auth import Authenticator, set_principal

log = logging.getLogger(__name__)

_KVSTORE_PREFIX = "/kvstore.v1."
_ADMIN_PREFIX = "/kvstore.v1.Admin/"
BUG_MESSAGE = ("internal error in the kvstore daemon ({}); this is a bug: please file it with the "
               "daemon log, which has the traceback")


def _aborted_code(context) -> str:
    """The status a handler aborted with (for the request counters)."""
    c = context.code()
    return c.name if isinstance(c, grpc.StatusCode) else "ABORTED_BY_HANDLER"


async def _fail(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> str:
    """Ends the call for ``exc``; returns the status code name it used."""
    if isinstance(exc, KVStoreError):
        code = exc.code
        await context.abort(grpc.StatusCode[code], str(exc))
    log.error("unexpected error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, BUG_MESSAGE.format(type(exc).__name__))
    return "INTERNAL"  # not reached: abort raises


class RequestInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator, stats: RequestStats) -> None:
        self._auth = authenticator
        self._stats = stats

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(_KVSTORE_PREFIX):
            return handler
        short = method[len(_KVSTORE_PREFIX):]
        admin = method.startswith(_ADMIN_PREFIX)
        metadata = details.invocation_metadata
        auth, stats = self._auth, self._stats

        def begin():
            p = auth.authenticate(metadata)
            if admin:
                p.require_admin()
            set_principal(p)

        def code_of(exc: BaseException) -> str:
            return exc.code if isinstance(exc, KVStoreError) else "INTERNAL"

        def single_response(inner):
            """Wraps a handler that returns one response (unary-unary and stream-unary alike:
            the first argument is the request or the request iterator)."""
            async def call(request_or_iterator, context):
                t0 = time.perf_counter()
                code = "OK"
                try:
                    begin()
                    return await inner(request_or_iterator, context)
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
                    stats.observe(short, code, time.perf_counter() - t0)
            return call

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(single_response(handler.unary_unary),
                                                       handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(single_response(handler.stream_unary),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request, context):
                t0 = time.perf_counter()
                code = "OK"
                try:
                    begin()
                    async for item in inner_us(request, context):
                        yield item
                except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
                    code = "CANCELLED"
                    raise
                except Exception as e:  # noqa: BLE001
                    code = code_of(e)
                    await _fail(context, e, method)
                finally:
                    stats.observe(short, code, time.perf_counter() - t0)

            return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return handler  # no bidirectional RPCs in v1
