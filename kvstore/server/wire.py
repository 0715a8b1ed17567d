"""Zero-extra-copy protobuf framing for the two bulk messages: Put data in, Get data out.

A data piece is ``GetResponse{data}`` / ``PutRequest{data}``: on the wire, the tag byte 0x12
(field 2, length-delimited), a varint length, then the bytes. Encoding it by hand from the
lease view costs one copy (into the outgoing message) instead of three (slice, protobuf
field, serialisation); decoding it by hand yields a memoryview into the received message
instead of two more copies. Every other message goes through the generated classes.
"""

from __future__ import annotations

from kvstore_client._proto.kvstore.v1 import data_pb2

_DATA_TAG = 0x12  # field 2, wire type 2 (length-delimited)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_data_piece(view: memoryview) -> bytes:
    """The serialised ``GetResponse(data=view)``."""
    return b"".join((bytes((_DATA_TAG,)), _varint(view.nbytes), view))


def serialize_get_response(msg) -> bytes:
    """Response serializer of Get: pre-encoded pieces pass through, messages serialise."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def deserialize_put_request(raw: bytes):
    """Request deserializer of Put: a data message becomes a memoryview of its bytes
    (no copy); anything else is parsed as a ``PutRequest``."""
    if len(raw) >= 2 and raw[0] == _DATA_TAG:
        n, shift, i = 0, 0, 1
        while i < len(raw) and i < 11:
            b = raw[i]
            n |= (b & 0x7F) << shift
            i += 1
            if not b & 0x80:
                if i + n == len(raw):
                    return memoryview(raw)[i:]
                break
            shift += 7
    return data_pb2.PutRequest.FromString(raw)
