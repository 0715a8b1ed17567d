"""``KVEventPublisher``: chunk stored/removed events per medium over ZMQ, vLLM's protocol.

Sockets (as vLLM's ``ZmqEventPublisher``): a PUB socket sends each batch as the multipart
message ``(topic, seq: 8-byte big-endian, payload: msgpack batch)``, ``seq`` counting from 0;
a ROUTER socket answers replay requests ``(identity, b"", start_seq: 8-byte big-endian)``
with every buffered ``(identity, b"", seq, payload)`` where ``seq >= start_seq``, then
``(identity, b"", -1 as 8 signed bytes, b"")``. kvstore adds one request: ``b"SNAPSHOT"``
instead of a sequence number is answered with one batch, at the sequence number of the last
published batch, holding ``AllBlocksCleared`` and then a ``BlockStored`` per medium for
every chunk present, then the end marker; a router that starts late (or whose replay
starts before the buffer) takes the snapshot and then follows PUB from ``seq + 1``.

Feeding: ``listener(cid, medium, present)`` is the ``Tier.listener`` hook (called with a
tier's lock held: it only appends to a deque and updates the presence view under a small
lock, never blocks). When more than ``events.queue_events`` events wait, new events are
dropped, counted, and the next batch is a full resync (the presence view stays exact).
One thread batches (``batch_interval_ms``, ``max_batch_events``), publishes and serves the
ROUTER; ZMQ sockets are only touched by that thread.

Lock order: ``_lock`` (queue + presence view) is a leaf; the thread never holds it while
sending.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

import zmq

from ..config import EventsConfig
from ..types import ChunkId, Medium, split_chunk_id
from .format import MEDIUM_NAMES, AllBlocksCleared, BlockRemoved, BlockStored, Event, encode_batch

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
SNAPSHOT_REQUEST = b"SNAPSHOT"
#: Events per BlockStored in a snapshot (keeps one event's array a reasonable size).
SNAPSHOT_HASHES_PER_EVENT = 4096


@dataclass(slots=True)
class PublisherStats:
    published_batches: int = 0
    published_events: int = 0
    dropped_events: int = 0
    resyncs: int = 0
    replays: int = 0
    snapshots: int = 0


def fan_out(*listeners: Callable[[ChunkId, Medium, bool], None] | None) -> Callable[[ChunkId, Medium, bool], None]:
    """One ``Tier.listener`` calling several (the presence index and the publisher)."""
    fns = [f for f in listeners if f is not None]

    def listener(cid: ChunkId, medium: Medium, present: bool) -> None:
        for f in fns:
            f(cid, medium, present)
    return listener


class KVEventPublisher:
    def __init__(self, cfg: EventsConfig, ctx: zmq.Context | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self._clock = clock
        self._ctx = ctx or zmq.Context.instance()
        self._lock = threading.Lock()
        self._pending: deque[tuple[ChunkId, Medium, bool]] = deque()
        self._present: dict[Medium, set[ChunkId]] = {}
        self._resync = False
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=cfg.replay_batches)
        self._seq = -1
        self._s = PublisherStats()
        self._stop = threading.Event()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._bind_or_connect(self._pub, cfg.endpoint)
        self._router = None
        if cfg.replay_endpoint:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.bind(cfg.replay_endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT) if self._router else ""
        self._topic = cfg.topic.encode()
        self._thread = threading.Thread(target=self._run, name="kvstore-events", daemon=True)
        self._thread.start()

    @staticmethod
    def _bind_or_connect(sock, endpoint: str) -> None:
        if "*" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)

    # -- feeding ------------------------------------------------------------------------
    def listener(self, cid: ChunkId, medium: Medium, present: bool) -> None:
        with self._lock:
            view = self._present.setdefault(medium, set())
            (view.add if present else view.discard)(cid)
            if len(self._pending) >= self.cfg.queue_events:
                self._s.dropped_events += 1
                self._resync = True
                return
            self._pending.append((cid, medium, present))

    def cleared(self, medium: Medium) -> None:
        """A whole medium was emptied (e.g. a tier cleared): resync subscribers."""
        with self._lock:
            self._present.pop(medium, None)
            self._resync = True

    def stats(self) -> PublisherStats:
        with self._lock:
            return PublisherStats(**{f: getattr(self._s, f) for f in PublisherStats.__slots__})

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._pub.close(0)
        if self._router is not None:
            self._router.close(0)

    # -- encoding -----------------------------------------------------------------------
    def _hash(self, cid: ChunkId):
        key = split_chunk_id(cid)[1]
        return int.from_bytes(key[:8], "big") if self.cfg.block_hash == "u64" else key

    def _events(self, items: Iterable[tuple[ChunkId, Medium, bool]]) -> list[Event]:
        """Consecutive events of one kind and medium merge into one event (as vLLM does)."""
        out: list[Event] = []
        run: list = []
        kind = None
        for cid, medium, present in items:
            if (medium, present) != kind and run:
                out.append(self._make(kind, run))
                run = []
            kind = (medium, present)
            run.append(self._hash(cid))
        if run:
            out.append(self._make(kind, run))
        return out

    def _make(self, kind, hashes) -> Event:
        medium, present = kind
        name = MEDIUM_NAMES.get(medium, medium.name)
        return BlockStored(hashes, name, self.cfg.block_size) if present else BlockRemoved(hashes, name)

    def _snapshot_events(self) -> list[Event]:
        """AllBlocksCleared, then everything present. Called with ``_lock`` held."""
        out: list[Event] = [AllBlocksCleared()]
        for medium, cids in self._present.items():
            items = sorted(cids)
            for i in range(0, len(items), SNAPSHOT_HASHES_PER_EVENT):
                out.append(self._make((medium, True), [self._hash(c) for c in items[i:i + SNAPSHOT_HASHES_PER_EVENT]]))
        return out

    def _encode(self, events: list[Event]) -> bytes:
        return encode_batch(self._clock(), events, self.cfg.data_parallel_rank, self.cfg.encoding)

    # -- thread -------------------------------------------------------------------------
    def _run(self) -> None:
        interval_s = self.cfg.batch_interval_ms / 1000.0
        poller = zmq.Poller()
        if self._router is not None:
            poller.register(self._router, zmq.POLLIN)
        next_flush = time.monotonic() + interval_s
        while not self._stop.is_set():
            timeout_ms = max(0, int((next_flush - time.monotonic()) * 1000))
            if self._router is not None:
                if poller.poll(timeout_ms):
                    self._serve_one()
            else:
                self._stop.wait(timeout_ms / 1000.0)
            if time.monotonic() >= next_flush:
                self._flush()
                next_flush = time.monotonic() + interval_s
        self._flush()

    def _flush(self) -> None:
        while True:
            with self._lock:
                if self._resync:
                    self._resync = False
                    self._pending.clear()
                    self._s.resyncs += 1
                    events = self._snapshot_events()
                else:
                    n = min(len(self._pending), self.cfg.max_batch_events)
                    if n == 0:
                        return
                    events = self._events([self._pending.popleft() for _ in range(n)])
            self._publish(events)

    def _publish(self, events: list[Event]) -> None:
        payload = self._encode(events)
        self._seq += 1
        self._pub.send_multipart((self._topic, self._seq.to_bytes(8, "big"), payload))
        self._buffer.append((self._seq, payload))
        with self._lock:
            self._s.published_batches += 1
            self._s.published_events += len(events)

    def _serve_one(self) -> None:
        frames = self._router.recv_multipart()
        if len(frames) == 3 and frames[1] == b"":
            ident, _, req = frames
        elif len(frames) == 2:  # a DEALER that sent no empty delimiter
            ident, req = frames
        else:
            log.warning("ignoring a malformed KV-events replay request (%d frames)", len(frames))
            return
        if req == SNAPSHOT_REQUEST:
            self._flush()  # everything before the snapshot's seq is published first
            if self._seq < 0:
                self._publish([])  # give the snapshot a real sequence number (0)
            with self._lock:
                events = self._snapshot_events()
                self._s.snapshots += 1
            self._router.send_multipart((ident, b"", max(self._seq, 0).to_bytes(8, "big"), self._encode(events)))
        elif len(req) == 8:
            start = int.from_bytes(req, "big")
            with self._lock:
                self._s.replays += 1
            for seq, payload in list(self._buffer):
                if seq >= start:
                    self._router.send_multipart((ident, b"", seq.to_bytes(8, "big"), payload))
        else:
            log.warning("ignoring a KV-events replay request of %d bytes (want 8, or SNAPSHOT)", len(req))
        self._router.send_multipart((ident, b"", END_SEQ, b""))
