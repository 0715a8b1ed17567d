"""Redis key names: tenant-salted so that nobody without the cluster secret can compute them.

``<prefix>:c:<tag>:<key hex>`` holds a chunk, where ``tag`` is 32 hex digits of
HMAC-SHA256(secret, namespace id). The namespace id already hashes the tenant, but tenant
names are not secret and keys are computable from token ids, so without the salt anyone who
can reach Redis could derive another tenant's keys; with it they need the secret.

No hash tag (``{...}``): Redis hashes the whole key, so one namespace's chunks spread over
every slot. A hash tag per namespace would put a whole model's cache on one master, the
hot spot of a single-model fleet; the prefix check is a pipelined EXISTS across nodes
instead (one round trip per node, run concurrently).

``<prefix>:c:<tag>:<key hex>:s`` is the small companion copy of the same chunk.
``<prefix>:q:{<tenant tag>}:<epoch>`` counts a tenant's bytes stored in TTL window ``epoch``;
the hash tag keeps a tenant's counters on one slot (tiny, so no hot spot).
"""

from __future__ import annotations

import hashlib
import hmac

from ...types import ChunkId, split_chunk_id

_NS_SALT = b"kvstore.remote.ns.v1\x00"
_TENANT_SALT = b"kvstore.remote.tenant.v1\x00"
#: Hex digits of the HMAC kept in a key: 128 bits, collision-free for any real fleet.
TAG_HEX = 32
SMALL_SUFFIX = b":s"
#: Bytes of a namespace id (the head of every chunk id): the shortest prefix that selects
#: one namespace's keys (``pattern``).
NAMESPACE_ID_BYTES = 32


class RemoteKeys:
    def __init__(self, secret: str, prefix: str) -> None:
        self._secret = secret.encode()
        self._prefix = prefix.encode()
        self._tags: dict[bytes, bytes] = {}

    def ns_tag(self, namespace_id: bytes) -> bytes:
        tag = self._tags.get(namespace_id)
        if tag is None:
            tag = hmac.new(self._secret, _NS_SALT + namespace_id, hashlib.sha256).hexdigest()[:TAG_HEX].encode()
            if len(self._tags) < 65536:  # namespaces are few; the bound only guards memory
                self._tags[namespace_id] = tag
        return tag

    def chunk(self, cid: ChunkId) -> bytes:
        ns, key = split_chunk_id(cid)
        return b"%s:c:%s:%s" % (self._prefix, self.ns_tag(ns), key.hex().encode())

    def small(self, cid: ChunkId) -> bytes:
        return self.chunk(cid) + SMALL_SUFFIX

    def pattern(self, prefix: bytes) -> bytes:
        """SCAN MATCH pattern covering every chunk whose id starts with ``prefix``."""
        if len(prefix) >= NAMESPACE_ID_BYTES:
            ns, key = split_chunk_id(prefix)
            return b"%s:c:%s:%s*" % (self._prefix, self.ns_tag(ns), key.hex().encode())
        return b"%s:c:*" % self._prefix

    def quota(self, tenant: str, epoch: int) -> bytes:
        tag = hmac.new(self._secret, _TENANT_SALT + tenant.encode(), hashlib.sha256).hexdigest()[:TAG_HEX]
        return b"%s:q:{%s}:%d" % (self._prefix, tag.encode(), epoch)
