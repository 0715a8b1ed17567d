"""The GPU benchmarks' daemon handle: ``kvstore_testing.daemon.spawn_daemon`` with the quiet
settings, as a class (``bench/gpu_probe.py`` subclasses it to start the daemon through
``gpu_trust_daemon.py``, swapping ``subprocess.Popen`` for the duration of the start)."""

from __future__ import annotations

import subprocess  # noqa: F401 (gpu_probe reaches subprocess.Popen through this module)

from kvstore_testing.daemon import QUIET_SETTINGS, spawn_daemon


class Daemon:
    def __init__(self, *settings: str) -> None:
        self._d = spawn_daemon(settings=[*QUIET_SETTINGS, *settings])
        self.addr = self._d.addr

    def close(self) -> None:
        self._d.close()
