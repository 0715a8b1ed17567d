"""Helpers of the GPU tests: a LeaseRead stub wrapper that counts the leasing calls, and the
arena offset of a stored chunk."""


class CountingLeases:
    """Wraps a session's LeaseRead stub: counts the leasing calls (touch-only ones apart)."""

    def __init__(self, stub):
        self._stub, self.leases, self.touches = stub, 0, 0

    def _count(self, req):
        if req.touch_only:
            self.touches += 1
        else:
            self.leases += 1

    def __call__(self, req, **kw):
        self._count(req)
        return self._stub(req, **kw)

    def future(self, req, **kw):
        self._count(req)
        return self._stub.future(req, **kw)


def count_leases(gp) -> CountingLeases:
    """Routes the GPU path ``gp``'s LeaseRead calls through a counter and returns it."""
    spy = CountingLeases(gp.client._lease_read)
    gp.client._lease_read = spy
    return spy


def arena_offset(client, key: bytes) -> int:
    """Where the arena holds the stored chunk ``key`` (leased once, released at once)."""
    from kvstore_client.gpu_session import GpuSession
    from kvstore_wire._proto.kvstore.v1 import local_pb2

    sess = GpuSession.of(client)
    r = sess._lease_read(local_pb2.LeaseReadRequest(namespace_id=client.namespace_id, keys=[key]),
                         metadata=sess._metadata)
    sess._release(local_pb2.ReleaseRequest(lease_ids=[r.lease_id]), metadata=sess._metadata)
    return r.extents[0].offset
