"""ONE real-daemon spawner for tests, benchmarks and the demo (no mocks of the storage).

    with spawn_daemon(settings=["dram.capacity_bytes=96MiB"]) as d:
        client = KVStoreClient(d.addr, ns)
        d.restart()          # SIGTERM, wait, start again on the same address and data dir
        d.kill()             # SIGKILL: the crash case

:func:`spawn_daemon` runs ``python -m kvstore.cli.daemon serve`` (the interpreter running
this code, so a virtual environment or ``PYTHONPATH`` carries over) on a free loopback port or
a unix socket, with a data directory, ``--set`` settings and an optional tokens file, and
returns once standard gRPC health says SERVING. The daemon's stdout and stderr go to a log
file; every start failure raises :class:`DaemonStartError` with the log's tail.

Ownership: a :class:`DaemonProcess` owns its child process. When :func:`spawn_daemon` made
the working directory itself (no ``base_dir`` given), :meth:`DaemonProcess.close` removes it
too; a caller-given directory is left in place. Not thread-safe: one owner drives it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .ports import LOOPBACK_HOST, free_port

#: How long a start may take before it counts as failed; a cold import of the daemon on two
#: busy CPU cores takes a few seconds, so this is generous.
STARTUP_TIMEOUT_S = 30.0
#: How long a signalled daemon may take to exit before it is SIGKILLed (its shutdown grace
#: plus the flush of the disk tier fit well inside).
STOP_TIMEOUT_S = 15.0
#: Pause between two health probes while waiting for SERVING.
HEALTH_POLL_S = 0.05
#: Deadline of one health probe.
HEALTH_RPC_TIMEOUT_S = 1.0
#: Characters of the daemon log quoted in a start error.
LOG_TAIL_CHARS = 4000
#: Environment variables of the daemon's config; dropped unless ``inherit_config_env``, so a
#: developer's shell never changes what a test daemon does.
CONFIG_ENV_PREFIX = "KVSTORE_"
#: Settings of daemons that only serve a benchmark or a demo: no metrics exporter (its port
#: would collide with another daemon's) and warnings only in the log.
QUIET_SETTINGS = ('metrics.listen=""', "log.level=WARNING")


class DaemonStartError(RuntimeError):
    """The daemon exited or did not become SERVING; the message quotes its log."""


@dataclass
class DaemonProcess:
    """A ``kvstore serve`` child process that can be stopped, killed and restarted in place."""

    data_dir: Path
    #: ``host:port`` or ``unix:/path``, exactly what clients dial.
    listen: str
    log_path: Path
    #: ``--set`` overrides, in order (later ones win).
    settings: list[str] = field(default_factory=list)
    start_timeout_s: float = STARTUP_TIMEOUT_S
    #: How long :meth:`stop` and :meth:`kill` wait before they SIGKILL.
    stop_timeout_s: float = STOP_TIMEOUT_S
    #: Keep ``KVSTORE_*`` variables of this process's environment for the daemon.
    inherit_config_env: bool = False
    #: Start the daemon in a session of its own, so a terminal's Ctrl-C reaches only the parent
    #: (which then stops the daemon itself); the demo wants this.
    new_session: bool = False
    #: Removed by :meth:`close` (set by :func:`spawn_daemon` for a directory it created).
    owned_dir: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return self.listen

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "kvstore.cli.daemon", "serve", "--data-dir", str(self.data_dir),
               "--listen", self.listen]
        for s in self.settings:
            cmd += ["--set", s]
        return cmd

    def start(self) -> "DaemonProcess":
        """Starts the daemon and waits until it is SERVING; raises :class:`DaemonStartError`."""
        if self.running:
            raise RuntimeError(f"daemon on {self.listen} is already running (pid {self.proc.pid})")
        env = dict(os.environ) if self.inherit_config_env else {
            k: v for k, v in os.environ.items() if not k.startswith(CONFIG_ENV_PREFIX)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=self.new_session)
        try:
            self.wait_serving()
        except BaseException:
            self.kill()
            raise
        return self

    def wait_serving(self) -> None:
        """Waits for SERVING; raises :class:`DaemonStartError` (quoting the log) when the process
        exits first or ``start_timeout_s`` passes."""
        try:
            wait_serving(self.listen, self.start_timeout_s, proc=self.proc)
        except DaemonStartError as e:
            raise DaemonStartError(f"{e}; log {self.log_path}:\n{self.log_tail()}") from None

    def log(self) -> str:
        """Everything the daemon wrote so far (all starts), or "" before the first."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log()[-chars:]

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float | None = None) -> int:
        """Sends ``sig`` (default SIGKILL: a crash) and waits; SIGKILLs after ``timeout_s``
        (default ``stop_timeout_s``).

        Returns the exit status (negative: the signal number); 0 when never started.
        """
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(self.stop_timeout_s if timeout_s is None else timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def stop(self, timeout_s: float | None = None) -> int:
        """SIGTERM: a clean shutdown (the daemon drains, flushes and removes its shared-memory arena)."""
        return self.kill(signal.SIGTERM, timeout_s)

    terminate = stop

    def restart(self) -> "DaemonProcess":
        """Stops cleanly and starts again: same address, data dir, settings (as they are now) and log."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stops the daemon and removes the working directory when this object owns it."""
        self.stop()
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)
            self.owned_dir = None

    def __enter__(self) -> "DaemonProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_serving(addr: str, timeout_s: float, *, proc: subprocess.Popen | None = None) -> None:
    """Polls standard gRPC health at ``addr`` until SERVING.

    Raises :class:`DaemonStartError` when ``proc`` (the daemon, if this process started it)
    exits first or ``timeout_s`` passes; the message says which.
    """
    deadline = time.monotonic() + timeout_s
    last: grpc.RpcError | None = None
    with grpc.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise DaemonStartError(f"daemon exited with status {proc.returncode} before serving")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_RPC_TIMEOUT_S)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as e:
                last = e  # not listening yet: poll again until the deadline
            time.sleep(HEALTH_POLL_S)
    detail = f" (last error: {last.code().name})" if last is not None else ""
    raise DaemonStartError(f"no SERVING kvstore daemon at {addr} after {timeout_s:.0f}s{detail}")


def write_tokens_file(path: Path, tokens: Mapping[str, Mapping[str, object]]) -> Path:
    """Writes an ``auth.tokens_file``: ``{token: {"tenant": str, "admin": bool}}``."""
    lines = ["[tokens]"]
    for tok, entry in tokens.items():
        lines.append(f'"{tok}" = {{ tenant = "{entry["tenant"]}", admin = {str(bool(entry["admin"])).lower()} }}')
    path.write_text("\n".join(lines) + "\n")
    return path


def spawn_daemon(*, base_dir: Path | None = None, data_dir: Path | None = None, unix: bool = False,
                 port: int | None = None, settings: Iterable[str] = (),
                 tokens: Mapping[str, Mapping[str, object]] | None = None,
                 start_timeout_s: float = STARTUP_TIMEOUT_S, stop_timeout_s: float = STOP_TIMEOUT_S,
                 inherit_config_env: bool = False,
                 new_session: bool = False, start: bool = True) -> DaemonProcess:
    """Builds (and by default starts) a daemon whose files live under ``base_dir``.

    ``base_dir`` (default: a fresh temp directory, removed by ``close()``) holds the data dir
    (unless ``data_dir`` is given), ``daemon.log``, the unix socket (``unix=True``; otherwise
    ``127.0.0.1:<port or a free port>``) and ``tokens.toml`` when ``tokens`` turns auth on.
    """
    owned = None
    if base_dir is None:
        base_dir = owned = Path(tempfile.mkdtemp(prefix="kvstore-daemon-"))
    base_dir.mkdir(parents=True, exist_ok=True)
    listen = f"unix:{base_dir}/kvstore.sock" if unix else f"{LOOPBACK_HOST}:{port or free_port()}"
    extra = list(settings)
    if tokens is not None:
        extra.append(f'auth.tokens_file="{write_tokens_file(base_dir / "tokens.toml", tokens)}"')
    d = DaemonProcess(data_dir or base_dir / "data", listen, base_dir / "daemon.log", extra,
                      start_timeout_s=start_timeout_s, stop_timeout_s=stop_timeout_s,
                      inherit_config_env=inherit_config_env,
                      new_session=new_session, owned_dir=owned)
    if start:
        try:
            d.start()
        except BaseException:
            d.close()
            raise
    return d
