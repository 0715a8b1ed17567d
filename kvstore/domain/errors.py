"""One exception hierarchy for the daemon, named after the gRPC status codes.

The core (tiers, index, codec) raises these and never imports grpc; ``kvstore.server.status``
maps them to status codes in one place. Messages say what the caller should do.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Base class. ``code`` is the name of a ``grpc.StatusCode`` member."""

    code = "INTERNAL"


class InvalidArgument(KVStoreError, ValueError):
    code = "INVALID_ARGUMENT"


class NotFound(KVStoreError, LookupError):
    code = "NOT_FOUND"


class AlreadyExists(KVStoreError):
    code = "ALREADY_EXISTS"


class PermissionDenied(KVStoreError):
    code = "PERMISSION_DENIED"


class Unauthenticated(KVStoreError):
    code = "UNAUTHENTICATED"


class ResourceExhausted(KVStoreError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(KVStoreError):
    code = "FAILED_PRECONDITION"


class OutOfRange(KVStoreError):
    code = "OUT_OF_RANGE"


class DataLoss(KVStoreError):
    """Stored bytes failed verification. Raised internally; reads turn it into a miss."""

    code = "DATA_LOSS"


class Unavailable(KVStoreError):
    code = "UNAVAILABLE"


class DeadlineExceeded(KVStoreError):
    code = "DEADLINE_EXCEEDED"


class Internal(KVStoreError):
    code = "INTERNAL"
