"""Thin client for the kvstore daemon. Needs only grpcio, protobuf and numpy (torch optional)."""

from kvstore_wire.keys import Namespace, chunk_key, prefix_keys
from kvstore_wire.types import DType, Durability, Encoding, KeyKind, Layout, Tier
from ._common import LookupResult
from ._views import LeasedChunk, LeasedViews
from .client import KVStoreClient
from .aio import AsyncKVStoreClient
from .errors import KVStoreClientError, KVStoreUnavailable

__all__ = ["Namespace", "chunk_key", "prefix_keys", "DType", "Durability", "Encoding", "KeyKind", "Layout", "Tier",
           "KVStoreClient", "AsyncKVStoreClient", "LookupResult", "LeasedChunk", "LeasedViews",
           "KVStoreClientError", "KVStoreUnavailable"]
