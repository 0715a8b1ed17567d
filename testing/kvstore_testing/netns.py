"""A throttled network link for benchmarks: a network namespace joined to the root namespace
by a veth pair, with a ``tbf`` qdisc on each end (both directions paced by the kernel).

    with ThrottledNetns(rate_bits_per_s=10e9) as link:     # needs root, ip(8) and tc(8)
        cluster = LocalRedisCluster(tmp, host=link.inner_ip, wrap=link.wrap).start()
        link.set_rate(1e9)                                  # change the rate at any time
        link.unthrottle()                                   # or no qdisc at all

Processes started through ``wrap(argv)`` (``ip netns exec <ns> argv``, which execs, so the
Popen pid is the program's) live inside the namespace and listen on ``inner_ip``; everything
in the root namespace reaches them through the veth pair, hence through the qdiscs.

Cleanup: ``close`` deletes the namespace (which destroys the veth pair and its qdiscs). It
runs from ``__exit__`` and, for a process that dies on SIGTERM/SIGHUP or ends without
reaching it, from an ``atexit`` hook; Ctrl-C raises KeyboardInterrupt through ``__exit__``.
Processes still inside the namespace must be stopped by their owner before ``close``.

``available()`` says whether this process may create namespaces (root and the tools);
``NetnsUnavailable`` carries the reason when setting one up fails.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time

#: tbf's bucket: this much of a second's worth of bytes at the rate (smooth pacing), but at
#: least ``_MIN_BURST_BYTES`` (one GSO super-packet of 64 KiB must always fit).
_BURST_S = 0.002
_MIN_BURST_BYTES = 256 * 1024
#: tbf's queue: packets waiting longer than this are dropped (TCP then backs off).
_TBF_LATENCY_MS = 50
#: The /30 subnets tried: 10.231.<n>.<4k> with the root end .1 and the namespace end .2.
_SUBNET_A, _SUBNET_B = 10, 231
_CMD_TIMEOUT_S = 10.0


class NetnsUnavailable(RuntimeError):
    """A namespace or qdisc could not be set up (not root, no ip/tc, no kernel support)."""


def available() -> str | None:
    """None when namespaces can be tried here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    return f"{', '.join(missing)} not on PATH" if missing else None


def _sh(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    if r.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(argv)}` failed: {r.stderr.strip() or r.returncode}")


class ThrottledNetns:
    def __init__(self, rate_bits_per_s: float | None = None, tag: str | None = None) -> None:
        why = available()
        if why:
            raise NetnsUnavailable(why)
        tag = tag or f"{os.getpid() % 100000}{random.randrange(100):02d}"
        self.name = f"kvs-bench-{tag}"
        self.outer_dev, self.inner_dev = f"kvsO{tag}"[:15], f"kvsI{tag}"[:15]
        n = random.randrange(1, 250)
        k = random.randrange(0, 63) * 4
        self.outer_ip, self.inner_ip = f"{_SUBNET_A}.{_SUBNET_B}.{n}.{k + 1}", f"{_SUBNET_A}.{_SUBNET_B}.{n}.{k + 2}"
        self.rate_bits_per_s: float | None = None
        self._closed = False
        self._lock = threading.Lock()
        atexit.register(self.close)
        self._old_handlers = {}
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if threading.current_thread() is threading.main_thread():
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._setup()
            if rate_bits_per_s:
                self.set_rate(rate_bits_per_s)
        except BaseException:
            self.close()
            raise

    def _on_signal(self, signum, frame) -> None:
        raise SystemExit(128 + signum)  # unwinds through every finally / __exit__

    def _setup(self) -> None:
        _sh("ip", "netns", "add", self.name)
        _sh("ip", "link", "add", self.outer_dev, "type", "veth", "peer", "name", self.inner_dev)
        _sh("ip", "link", "set", self.inner_dev, "netns", self.name)
        _sh("ip", "addr", "add", f"{self.outer_ip}/30", "dev", self.outer_dev)
        _sh("ip", "link", "set", self.outer_dev, "up")
        inner = ("ip", "netns", "exec", self.name)
        _sh(*inner, "ip", "addr", "add", f"{self.inner_ip}/30", "dev", self.inner_dev)
        _sh(*inner, "ip", "link", "set", self.inner_dev, "up")
        _sh(*inner, "ip", "link", "set", "lo", "up")

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def set_rate(self, bits_per_s: float) -> None:
        """Paces both directions of the veth pair to ``bits_per_s`` (tbf on each end)."""
        rate_bytes = bits_per_s / 8
        burst = max(_MIN_BURST_BYTES, int(rate_bytes * _BURST_S))
        spec = ("root", "tbf", "rate", f"{int(bits_per_s)}bit", "burst", str(burst),
                "latency", f"{_TBF_LATENCY_MS}ms")
        _sh("tc", "qdisc", "replace", "dev", self.outer_dev, *spec)
        _sh("ip", "netns", "exec", self.name, "tc", "qdisc", "replace", "dev", self.inner_dev, *spec)
        self.rate_bits_per_s = bits_per_s

    def unthrottle(self) -> None:
        """Removes the qdiscs (the veth pair's own speed)."""
        if self.rate_bits_per_s is None:
            return
        _sh("tc", "qdisc", "del", "dev", self.outer_dev, "root")
        _sh("ip", "netns", "exec", self.name, "tc", "qdisc", "del", "dev", self.inner_dev, "root")
        self.rate_bits_per_s = None

    def measure_bits_per_s(self, nbytes: int = 256 * 1024 * 1024) -> float:
        """A raw TCP transfer of ``nbytes`` from inside the namespace to here (one connection,
        the way a Redis reply travels): the link's achieved rate, the ceiling of any fetch."""
        with socket.socket() as srv:
            srv.bind((self.outer_ip, 0))
            srv.listen(1)
            port = srv.getsockname()[1]
            code = ("import socket,sys;s=socket.create_connection((sys.argv[1],int(sys.argv[2])));"
                    "b=bytes(4<<20);n=int(sys.argv[3])\n"
                    "while n>0:\n k=min(n,len(b));s.sendall(b[:k]);n-=k\n"
                    "s.shutdown(socket.SHUT_WR);s.recv(1)")
            sender = subprocess.Popen(self.wrap(["python3", "-c", code, self.outer_ip, str(port), str(nbytes)]))
            try:
                srv.settimeout(_CMD_TIMEOUT_S)
                conn, _ = srv.accept()
                with conn:
                    buf = bytearray(4 << 20)
                    view = memoryview(buf)
                    got, t0 = 0, time.perf_counter()
                    while got < nbytes:
                        k = conn.recv_into(view)
                        if not k:
                            break
                        got += k
                    seconds = time.perf_counter() - t0
                    conn.sendall(b"x")
            finally:
                sender.wait(_CMD_TIMEOUT_S)
        return got * 8 / seconds

    def close(self) -> None:
        """Deletes the namespace, the veth pair and the qdiscs (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=_CMD_TIMEOUT_S)
        # The pair goes with the namespace; only a half-made setup can leave the outer end.
        subprocess.run(["ip", "link", "del", self.outer_dev], capture_output=True, timeout=_CMD_TIMEOUT_S)
        if threading.current_thread() is threading.main_thread():
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)
        atexit.unregister(self.close)

    def __enter__(self) -> "ThrottledNetns":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
