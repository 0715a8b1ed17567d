"""Hand framing of the bulk data messages (``PutRequest{data}`` / ``GetResponse{data}``).

Both are field 2 (tag byte 0x12), length-delimited. Encoding from a buffer view costs one
copy; decoding returns a memoryview into the received message (no copy). Every other
message goes through the generated protobuf classes. Shared by the client and the daemon.
"""

from __future__ import annotations

DATA_TAG = 0x12  # field 2, wire type 2


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


def encode_data(view) -> bytes:
    """The serialised ``{PutRequest,GetResponse}(data=view)``."""
    view = memoryview(view)
    return b"".join((bytes((DATA_TAG,)), _varint(view.nbytes), view))


def serializer(msg) -> bytes:
    """Pre-encoded messages pass through; protobuf messages serialise."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def data_or_message(raw: bytes, message_cls):
    """A memoryview of the data of a data-only message, else ``message_cls.FromString(raw)``."""
    if len(raw) >= 2 and raw[0] == DATA_TAG:
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
    return message_cls.FromString(raw)
