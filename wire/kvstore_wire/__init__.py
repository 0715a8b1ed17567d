"""The wire contract shared by the kvstore daemon and its clients, and nothing else.

- ``kvstore_wire._proto``: generated protobuf / gRPC modules of ``proto/kvstore/v1``;
- ``keys``: the key spec (docs/keys.md): namespace ids, prefix and chunk keys;
- ``types``: the enums of the contract (dtype, layout, tier, encoding, key kind, durability);
- ``presence``: the byte layout of the shared-memory presence index (writer and reader);
- ``framing``: the hand-framed bulk data messages;
- ``crc``: CRC32C of payloads (native, a hardware wheel, or pure Python: never off).

The daemon (``kvstore``) and the client (``kvstore_client``) depend on this package and
never on each other.
"""
