"""Loopback ports for daemons started by tests, benchmarks and the demo."""

from __future__ import annotations

import socket

#: The only interface helpers listen on: nothing they start is reachable from another host.
LOOPBACK_HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now.

    The port is free when this returns; a process started afterwards may still lose a race
    for it with another process, which shows as a daemon that fails to start (its log says so).
    """
    with socket.socket() as s:
        s.bind((LOOPBACK_HOST, 0))
        return s.getsockname()[1]
