"""Client exceptions, one per gRPC status code that callers handle differently.

Every exception carries ``code`` (a ``grpc.StatusCode``) and the daemon's message, which
says what to fix.
"""

from __future__ import annotations

import grpc


class KVStoreClientError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class KVStoreUnavailable(KVStoreClientError, ConnectionError):
    """The daemon cannot be reached (not running, wrong address, or shutting down)."""
    code = grpc.StatusCode.UNAVAILABLE


class InvalidArgument(KVStoreClientError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(KVStoreClientError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(KVStoreClientError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(KVStoreClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DataLoss(KVStoreClientError):
    """A chunk's bytes failed their checksum (in transit or at rest)."""
    code = grpc.StatusCode.DATA_LOSS


class ResourceExhausted(KVStoreClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


_BY_CODE = {c.code: c for c in (KVStoreUnavailable, InvalidArgument, NotFound, Unauthenticated, PermissionDenied,
                                DataLoss, ResourceExhausted)}


def is_exhausted(e: grpc.RpcError) -> bool:
    """Whether a failed call was answered RESOURCE_EXHAUSTED (a quota, or no arena room)."""
    code = getattr(e, "code", None)
    return callable(code) and code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def from_rpc_error(e: grpc.RpcError, addr: str) -> KVStoreClientError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    if code == grpc.StatusCode.UNAVAILABLE:
        return KVStoreUnavailable(f"cannot reach kvstore at {addr}: is the daemon running? start it with "
                                  f"`kvstore serve` ({details})")
    cls = _BY_CODE.get(code, KVStoreClientError)
    return cls(f"{code.name}: {details}", code)
