"""Helpers of the GPU tests: a LeaseRead stub wrapper that counts the leasing calls."""


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
