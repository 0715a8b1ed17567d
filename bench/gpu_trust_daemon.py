"""What-if launcher for bench/gpu_probe.py: the real daemon, except that CommitWrite takes the
client's CRC32Cs (computed on the GPU by kvstore_client.gpu) instead of reading every committed
byte again on the CPU. This is the server change the GPU store path needs (see the gpu branch
report); benchmarks label its numbers as such. Usage: python bench/gpu_trust_daemon.py serve ..."""

from __future__ import annotations

import sys

from kvstore.cli import daemon
from kvstore.server import local

_orig = local.LocalDataServicer._commit


def _commit_trusting(self, lease, crcs, durability):
    if not crcs or len(crcs) != len(lease.reservations) or not all(crcs):
        return _orig(self, lease, crcs, durability)
    stored = existed = 0
    for n in range(len(lease.reservations)):
        _, res, meta = lease.reservations.pop(0)
        result = self._m.commit_local(res, meta.with_payload(meta.encoding, meta.payload_bytes, crcs[n]), durability)
        stored += result.name == "STORED"
        existed += result.name != "STORED"
    return stored, existed


local.LocalDataServicer._commit = _commit_trusting

if __name__ == "__main__":
    sys.exit(daemon.main())
