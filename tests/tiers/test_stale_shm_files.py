"""Shared-memory files of daemons that died without cleaning up are removed at the next start:
the arena, the presence index, the control socket and the HBM pool's generation counters; a
live daemon's files, other users' files and unrelated names are left alone."""

import os
import socket
import subprocess
import sys

from kvstore.tiers.arena import SHM_DIR, remove_stale_arenas


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_files_of_dead_daemons_are_removed_and_nothing_else():
    dead, live = _dead_pid(), os.getppid()
    stale = [SHM_DIR / f"kvstore-{dead}.arena", SHM_DIR / f"kvstore-{dead}.index",
             SHM_DIR / f"kvstore-{dead}-0a1b2c3d.hbmgen"]
    kept = [SHM_DIR / f"kvstore-{live}.arena", SHM_DIR / f"kvstore-{live}-0a1b2c3d.hbmgen",
            SHM_DIR / f"kvstore-{dead}.hbmgen.bak", SHM_DIR / f"kvstore-{dead}-XYZ.hbmgen"]
    sockets = [SHM_DIR / f"kvstore-{dead}.arena.ctl", SHM_DIR / f"kvstore-{live}.arena.ctl"]
    stale.append(sockets[0])
    kept.append(sockets[1])
    try:
        for f in stale + kept:
            if f in sockets:   # a real unix socket file, as a killed daemon leaves it
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.bind(str(f))
            else:
                f.write_bytes(b"x")
        assert remove_stale_arenas() >= len(stale)
        assert not any(f.exists() for f in stale)
        assert all(f.exists() for f in kept)
    finally:
        for f in stale + kept:
            f.unlink(missing_ok=True)
