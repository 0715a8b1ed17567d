"""Server side of the hand-framed bulk messages (see ``kvstore_wire.framing``)."""

from __future__ import annotations

from kvstore_wire._proto.kvstore.v1 import data_pb2
from kvstore_wire.framing import encode_data as encode_data_piece
from kvstore_wire.framing import data_or_message, serializer as serialize_get_response

__all__ = ["encode_data_piece", "serialize_get_response", "deserialize_put_request"]


def deserialize_put_request(raw: bytes):
    """Put's request deserializer: a data message becomes a memoryview of its bytes (no copy)."""
    return data_or_message(raw, data_pb2.PutRequest)
