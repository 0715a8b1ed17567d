"""Thin client for the kvstore daemon. Needs only grpcio, protobuf and numpy (torch optional)."""

from .keys import Namespace, chunk_key, prefix_keys
from .types import DType, Durability, Encoding, KeyKind, Layout, Tier

__all__ = ["Namespace", "chunk_key", "prefix_keys", "DType", "Durability", "Encoding", "KeyKind", "Layout", "Tier"]
