"""A rate-limited TCP proxy in front of every node of a loopback Redis Cluster (tests, benches).

``ThrottledCluster(cluster, bytes_per_s)`` listens on one new loopback port per node and
forwards both directions, pacing each direction to ``bytes_per_s`` (a token bucket per
connection direction). Pass ``proxy.nodes`` as ``remote.nodes`` and ``proxy.remap`` as the
link's ``address_remap`` so the slot map's real ports are replaced by the proxy's. ``rate``
may be changed while running. Where ``tc`` in a network namespace is not available, this is
the harness's throttled link.
"""

from __future__ import annotations

import asyncio
import threading
import time

#: Bytes forwarded per read; small enough that pacing is smooth at 1 Gbit/s.
_PIECE = 64 * 1024


class ThrottledCluster:
    def __init__(self, cluster, bytes_per_s: float) -> None:
        self.rate = bytes_per_s
        self._targets = [int(n.rsplit(":", 1)[1]) for n in cluster.nodes]
        self._map: dict[int, int] = {}
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.AbstractServer] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="throttle", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    @property
    def nodes(self) -> list[str]:
        return [f"127.0.0.1:{self._map[p]}" for p in self._targets]

    def remap(self, addr: tuple[str, int]) -> tuple[str, int]:
        host, port = addr
        return ("127.0.0.1", self._map.get(int(port), int(port)))

    async def _start(self) -> None:
        for target in self._targets:
            srv = await asyncio.start_server(lambda r, w, t=target: self._serve(r, w, t), "127.0.0.1", 0)
            self._servers.append(srv)
            self._map[target] = srv.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer, target: int) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pump(reader, uw), self._pump(ur, writer), return_exceptions=True)

    async def _pump(self, reader, writer) -> None:
        sent, t0 = 0, time.monotonic()
        try:
            while data := await reader.read(_PIECE):
                writer.write(data)
                await writer.drain()
                sent += len(data)
                ahead = sent / self.rate - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)
                elif ahead < -0.05:  # idle gaps do not bank credit beyond 50 ms
                    sent, t0 = 0, time.monotonic()
        finally:
            writer.close()

    def close(self) -> None:
        async def stop():
            for s in self._servers:
                s.close()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
