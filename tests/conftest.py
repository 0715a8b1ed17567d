"""Fixtures that run a REAL kvstore daemon process (no mocks of the storage).

``daemon_factory(**opts)`` starts ``python -m kvstore.cli.daemon serve`` on a free loopback
port (or a unix socket) with a ``tmp_path`` data directory and small capacities, waits until
gRPC health says SERVING, and stops it at teardown. Module-scoped ``daemon`` and
``auth_daemon`` are shared by tests that only need a running daemon (each test uses its own
namespace, so tests do not see each other's chunks). The spawner is
:mod:`kvstore_testing.daemon`, shared with the benchmarks and the demo.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore_testing.daemon import DaemonProcess, spawn_daemon
from kvstore_testing.data import TOKENS

#: Small capacities and no metrics port: many daemons run side by side on a small machine.
SMALL = ["dram.capacity_bytes=96MiB", "disk.capacity_bytes=512MiB", 'metrics.listen=""', "server.worker_threads=4",
         "server.shutdown_grace_s=1"]


@pytest.fixture
def daemon_factory(tmp_path_factory):
    started: list[DaemonProcess] = []

    def make(*, unix: bool = False, auth: bool = False, settings: tuple[str, ...] = (),
             data_dir: Path | None = None) -> DaemonProcess:
        d = spawn_daemon(base_dir=tmp_path_factory.mktemp("kvstore"), data_dir=data_dir, unix=unix,
                         settings=[*SMALL, *settings], tokens=TOKENS if auth else None, start=False)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()  # SIGTERM: the daemon removes its shared-memory arena


def _module_daemon(tmp_path_factory, auth: bool) -> DaemonProcess:
    return spawn_daemon(base_dir=tmp_path_factory.mktemp("kvstore-shared"), settings=SMALL,
                        tokens=TOKENS if auth else None)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = _module_daemon(tmp_path_factory, auth=False)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def auth_daemon(tmp_path_factory):
    d = _module_daemon(tmp_path_factory, auth=True)
    yield d
    d.stop()


# ---------------------------------------------------------------------------- hang watchdog
#: pytest-timeout's signal method fails a test that runs past its timeout by raising in the
#: main thread; a test blocked there on worker threads (a thread pool's exit, a join) still
#: cannot end, and the whole run then hangs until CI kills it with nothing printed. This
#: watchdog gives each test its timeout plus this grace; past that it prints every thread's
#: stack and exits the run, so CI ends with the hung test named.
WATCHDOG_GRACE_S = 120


def _test_timeout(item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    try:
        return float(item.config.getini("timeout") or 0)
    except (ValueError, KeyError):
        return 0.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import faulthandler
    import os
    import sys
    import threading

    limit = _test_timeout(item)
    done = threading.Event()

    def watch() -> None:
        if done.wait(limit + WATCHDOG_GRACE_S):
            return
        capman = item.config.pluginmanager.getplugin("capturemanager")
        try:
            if capman is not None:
                capman.suspend_global_capture(in_=False)   # fd 2 is the terminal/CI log again
        except Exception:  # noqa: BLE001 - the run is being ended either way
            pass
        sys.stderr.write(f"\n\nWATCHDOG: {item.nodeid} still running {limit + WATCHDOG_GRACE_S:.0f} s after it "
                         f"started (its timeout is {limit:.0f} s); the stacks of every thread follow, then the "
                         "run exits\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(3)

    if limit > 0:
        threading.Thread(target=watch, name="kvstore-test-watchdog", daemon=True).start()
    try:
        yield
    finally:
        done.set()
