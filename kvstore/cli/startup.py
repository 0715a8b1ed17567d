"""What the operator sees when the daemon starts or fails to: the banner and one-line errors.

``banner`` is the block logged once the daemon serves: where its data is, how much memory
and disk it may use, where it listens, who may call it and how to stop it.
``failure`` turns any exception that ends a start into (one line for stderr, exit status):
2 for a configuration the operator must change (bad values, ports in use, unwritable
paths, missing files), 1 for anything else. The traceback of an unexpected exception goes
to the log at DEBUG, never to the terminal.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .. import __version__
from ..config import Config
from ..errors import KVStoreError

log = logging.getLogger("kvstore")

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_BAD_CONFIG = 2
#: Error codes that mean "change the configuration", answered with EXIT_BAD_CONFIG.
_CONFIG_CODES = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "ALREADY_EXISTS", "PERMISSION_DENIED"})


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def failure(exc: BaseException) -> tuple[str, int]:
    """(``kvstore: ...`` line, exit status) for an exception that stopped the start."""
    if isinstance(exc, KVStoreError):
        code = EXIT_BAD_CONFIG if exc.code in _CONFIG_CODES else EXIT_START_FAILED
        return f"kvstore: cannot start: {_one_line(exc)}", code
    if isinstance(exc, PermissionError):
        return f"kvstore: cannot start: permission denied: {_one_line(exc)}", EXIT_BAD_CONFIG
    if isinstance(exc, OSError):
        return f"kvstore: cannot start: {_one_line(exc)}", EXIT_START_FAILED
    log.debug("start failed", exc_info=exc)
    return (f"kvstore: cannot start: unexpected {type(exc).__name__}: {_one_line(exc)} (a bug: rerun with "
            "--set log.level=DEBUG and report the log)", EXIT_START_FAILED)


def banner(config: Config, arena_path: Path | None, pid: int | None = None) -> str:
    """The start-up summary (multi-line, for the log)."""
    pid = os.getpid() if pid is None else pid
    d, m = config.disk, config.dram
    data = Path(d.path).absolute()
    arena = (f"{arena_path} ({_size(m.capacity_bytes)}, shared with same-host clients)" if arena_path is not None
             else f"private ({_size(m.capacity_bytes)}; same-host clients use the stream path)")
    disk = (f"{_size(d.capacity_bytes)} in {data / 'chunks'}, policy {d.policy.value}, "
            f"fsync {'on' if d.fsync else 'off'}, scrub "
            + (f"{_size(d.scrub_bytes_per_s)}/s" if d.scrub_bytes_per_s else "off")) if d.enabled else "off"
    if config.auth.enabled:
        auth = "tokens" + (f" from {Path(config.auth.tokens_file).absolute()}" if config.auth.tokens_file else "")
    else:
        auth = "off (every caller is admin: loopback and unix sockets only)"
    metrics = f"http://{config.metrics.listen}/metrics" if config.metrics.listen else "off"
    rows = [("data dir", str(data)), ("dram arena", arena), ("disk budget", disk),
            ("listening", ", ".join(config.server.listen)), ("auth", auth), ("metrics", metrics),
            ("stop", f"Ctrl-C, or kill -TERM {pid} (drains for up to {config.server.shutdown_grace_s:g}s)")]
    width = max(len(k) for k, _ in rows)
    return f"kvstore {__version__} serving (pid {pid})\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
