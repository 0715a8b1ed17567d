"""``RemoteTier``: chunks in a Redis Cluster shared by every replica's sidecar.

A tier like the others (``kvstore.tiers.base.Tier``), with three differences the chain must
know: (1) it never raises to the engine path: a slow, partitioned or down cluster makes
``get`` a miss and ``put`` a skip within ``remote.timeout_ms``, counted in
``remote_stats().errors``; (2) eviction belongs to Redis (per-value TTL, and the cluster's
``maxmemory-policy``), so ``evict`` frees nothing and ``pins`` do not apply; (3) ``put``
returns False both for "already present" and for "skipped" (over the tenant's quota, or the
cluster failed); ``store`` says which.

Values are ``format.encode`` (header with the chunk id, meta and CRC32C, then the payload),
verified on every read: a corrupt value is deleted, counted in ``corrupt`` and is a miss.
Keys are tenant-salted (``keys.RemoteKeys``). Quota: a tenant's bytes stored in the current
and the previous TTL window (``ttl_s``) are counted in Redis (INCRBY on store, DECRBY on
delete); since every value expires within one window of being stored, their sum bounds the
tenant's live bytes from above (values that already expired are counted until their window
rolls off). A store that would exceed the quota is skipped and counted.

Thread-safety: every method may be called from any thread; they block for at most the
deadline. Counters are updated under ``_lock``; the listener is called without any lock
held (the remote tier has none around Redis calls).
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from ...config import QuotaConfig, RemoteConfig, TierCodec
from ...errors import DataLoss, DeadlineExceeded, NotFound, Unavailable
from ...types import ChunkId, ChunkMeta, Medium, split_chunk_id
from ..base import ChunkRef, EntryInfo, Tier, TierStats
from . import format as fmt
from .adaptive import ThroughputMeter
from .keys import SMALL_SUFFIX, RemoteKeys
from .link import RedisLink

#: Part of the deadline a concurrent batch GET waits for stragglers before it returns what
#: arrived (the rest is a miss); the remainder covers cancelling and handing results back.
_BATCH_WAIT_FRACTION = 0.9
#: Admin calls (scan, prefix delete) walk every key of the deployment: their deadline is
#: this many times ``timeout_ms`` (still bounded; an admin may retry).
ADMIN_DEADLINE_FACTOR = 50
#: Keys per SCAN step.
_SCAN_COUNT = 1000

#: Namespace id -> tenant name (the namespace registry); NotFound -> accounted per namespace.
TenantResolver = Callable[[bytes], str]
#: Tenant name -> its ``quotas.max_remote_bytes`` (None: unlimited), from the daemon's ledger.
QuotaResolver = Callable[[str], "int | None"]


class StoreOutcome(enum.Enum):
    STORED = "stored"
    EXISTS = "exists"
    OVER_QUOTA = "over_quota"
    FAILED = "failed"


@dataclass(slots=True)
class RemoteStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    stored: int = 0
    already_present: int = 0
    quota_rejections: int = 0
    corrupt: int = 0
    errors: int = 0
    fast_fails: int = 0
    throughput_bytes_per_s: float = 0.0


class RemoteTier(Tier):
    medium = Medium.REMOTE

    def __init__(self, cfg: RemoteConfig, *, tenant_of: TenantResolver | None = None,
                 meter: ThroughputMeter | None = None, link: RedisLink | None = None,
                 clock: Callable[[], float] = time.time, quota_of: QuotaResolver | None = None) -> None:
        """``quota_of``: each tenant's byte quota in the cluster (``quotas.max_remote_bytes``
        and its per-token overrides, through the daemon's ledger); None: the ``[quotas]``
        default for every tenant."""
        self.cfg = cfg
        self.link = link or RedisLink(cfg)
        self.keys = RemoteKeys(cfg.key_secret, cfg.key_prefix)
        self.meter = meter or ThroughputMeter(cfg.initial_throughput_bytes_per_s, cfg.throughput_ewma_alpha)
        self._tenant_of = tenant_of
        default = QuotaConfig().max_remote_bytes
        self._quota_of_tenant: QuotaResolver = quota_of or (lambda tenant: default)
        self._clock = clock
        self._lock = threading.Lock()
        self._s = RemoteStats()

    # -- helpers ------------------------------------------------------------------------
    def _count(self, **delta: int) -> None:
        with self._lock:
            for k, v in delta.items():
                setattr(self._s, k, getattr(self._s, k) + v)

    def _tenant(self, namespace_id: bytes) -> str:
        if self._tenant_of is not None:
            try:
                return "t:" + self._tenant_of(namespace_id)
            except NotFound:
                pass  # a namespace the registry forgot: accounted on its own below
        return "n:" + namespace_id.hex()

    def _quota_of(self, tenant: str) -> int | None:
        """The quota of an accounting key: ``t:<tenant>``, or ``n:<namespace>`` for a namespace
        the registry does not know (the ``[quotas]`` default)."""
        return self._quota_of_tenant(tenant[2:] if tenant.startswith("t:") else "")

    def _epoch(self, at_s: float) -> int:
        return int(at_s // self.cfg.ttl_s)

    def _try(self, fn, what: str, default, timeout_s: float | None = None):
        """Runs a link call; a remote failure is counted by the link and becomes ``default``."""
        try:
            return self.link.run(fn, what, timeout_s)
        except (Unavailable, DeadlineExceeded):  # already counted by the link
            return default

    # -- reads --------------------------------------------------------------------------
    def get(self, cid: ChunkId) -> ChunkRef | None:
        return self.get_many([cid])[0]

    def get_many(self, cids: list[ChunkId], small: bool = False) -> list[ChunkRef | None]:
        """Fetches concurrently; what has not arrived by the deadline is a miss. ``small``
        prefers the small companion copy and falls back to the primary."""
        return [None if v is None else ChunkRef(v.cid, v.meta, v.payload, Medium.REMOTE)
                for v in self.get_values(cids, small)]

    def get_values(self, cids: list[ChunkId], small: bool = False,
                   timeout_s: float | None = None) -> list[fmt.StoredValue | None]:
        """``get_many`` with the stored level and companion flag (the reader needs them);
        ``timeout_s`` (default ``remote.timeout_ms``) bounds the whole call."""
        cids = list(cids)
        if not cids:
            return []
        deadline_s = self.link.timeout_s if timeout_s is None else timeout_s
        budget = deadline_s * _BATCH_WAIT_FRACTION

        async def one(c, cid):
            if small:
                raw = await c.get(self.keys.small(cid))
                if raw is not None:
                    return raw
            return await c.get(self.keys.chunk(cid))

        async def fetch(c):
            t0 = time.perf_counter()
            tasks = [asyncio.ensure_future(one(c, cid)) for cid in cids]
            done, pending = await asyncio.wait(tasks, timeout=budget)
            for t in pending:
                t.cancel()
            out = [t.result() if t in done and t.exception() is None else None for t in tasks]
            return out, time.perf_counter() - t0, len(pending) + sum(1 for t in done if t.exception())

        got = self._try(fetch, "get", None, deadline_s)
        raws, seconds, failed = got if got is not None else ([None] * len(cids), 0.0, len(cids))
        if failed and got is not None:
            self.link.count_errors(failed)
        refs: list[fmt.StoredValue | None] = []
        corrupt: list[ChunkId] = []
        nbytes = 0
        for cid, raw in zip(cids, raws):
            if raw is None:
                refs.append(None)
                continue
            try:
                v = fmt.decode(raw, cid)
            except DataLoss:
                corrupt.append(cid)
                refs.append(None)
                continue
            nbytes += len(raw)
            refs.append(v)
        self.meter.sample(nbytes, seconds)
        hits = sum(1 for r in refs if r is not None)
        self._count(hits=hits, misses=len(cids) - hits, bytes_read=nbytes, corrupt=len(corrupt))
        if corrupt:
            self.delete_many(corrupt)
        return refs

    def contains(self, cid: ChunkId) -> bool:
        return self.contains_many([cid])[0]

    def contains_many(self, cids: Iterable[ChunkId]) -> list[bool]:
        """One pipelined round trip (each node's commands run concurrently); all False on failure."""
        cids = list(cids)
        sizes = self.sizes(cids)
        return [False] * len(cids) if sizes is None else [n > 0 for n in sizes]

    def sizes(self, cids: list[ChunkId]) -> list[int] | None:
        """Stored value size per chunk, 0 when absent, in one pipelined round trip (STRLEN;
        a value is never empty: it has a header); None when the cluster failed."""
        if not cids:
            return []

        async def check(c):
            p = c.pipeline(transaction=False)
            for cid in cids:
                p.strlen(self.keys.chunk(cid))
            return [int(x) for x in await p.execute()]

        return self._try(check, "exists", None)

    def headers(self, cids: list[ChunkId]) -> list[tuple[int, TierCodec | None] | None] | None:
        """Per chunk ``(stored value size, level)`` from its header, None when absent or the
        header does not verify, in one pipelined round trip (GETRANGE of the header); None
        when the cluster failed. What the reader plans a fetch with."""
        if not cids:
            return []

        async def check(c):
            p = c.pipeline(transaction=False)
            for cid in cids:
                p.getrange(self.keys.chunk(cid), 0, fmt.HEADER.size - 1)
            return await p.execute()

        raws = self._try(check, "exists", None)
        if raws is None:
            return None
        out: list[tuple[int, TierCodec | None] | None] = []
        for cid, raw in zip(cids, raws):
            try:
                got, meta, level, _ = fmt.decode_header(raw) if raw else (None, None, None, None)
            except DataLoss:
                got = None  # the full read drops it (and counts it)
            out.append((fmt.HEADER.size + meta.payload_bytes, level) if got == cid else None)
        return out

    def longest_prefix(self, cids: list[ChunkId]) -> int:
        """How many leading chunks of ``cids`` are present (one round trip); 0 on failure."""
        sizes = self.sizes(list(cids)) or []
        return next((i for i, n in enumerate(sizes) if not n), len(sizes))

    # -- writes -------------------------------------------------------------------------
    def put(self, cid: ChunkId, meta: ChunkMeta, payload) -> bool:
        return self.store(cid, meta, payload) is StoreOutcome.STORED

    def store(self, cid: ChunkId, meta: ChunkMeta, payload, level: TierCodec | None = None,
              small: tuple[ChunkMeta, object, TierCodec] | None = None) -> StoreOutcome:
        """Stores ``payload`` (as ``level``), and optionally a small companion copy
        ``(meta, payload, level)``; never raises for a remote failure."""
        value = fmt.encode(cid, meta, payload, level)
        small_value = fmt.encode(cid, small[0], small[1], small[2], small=True) if small else None
        size = len(value) + (len(small_value) if small_value else 0)
        tenant = self._tenant(split_chunk_id(cid)[0])
        quota = self._quota_of(tenant)
        ttl_ms = self.cfg.ttl_s * 1000
        epoch = self._epoch(self._clock())
        qk, qprev = self.keys.quota(tenant, epoch), self.keys.quota(tenant, epoch - 1)

        async def run(c):
            p = c.pipeline(transaction=False)
            p.incrby(qk, size)
            p.expire(qk, 2 * self.cfg.ttl_s)
            p.get(qprev)
            used, _, prev = await p.execute()
            if quota is not None and used + int(prev or 0) > quota:
                await c.decrby(qk, size)
                return StoreOutcome.OVER_QUOTA, 0
            t0 = time.perf_counter()
            p = c.pipeline(transaction=False)
            p.set(self.keys.chunk(cid), value, nx=True, px=ttl_ms)
            if small_value is not None:
                p.set(self.keys.small(cid), small_value, nx=True, px=ttl_ms)
            done = await p.execute()
            self.meter.sample(size, time.perf_counter() - t0)
            unused = (0 if done[0] else len(value)) + (0 if small_value is None or done[1] else len(small_value))
            if unused:
                await c.decrby(qk, unused)
            return (StoreOutcome.STORED if done[0] else StoreOutcome.EXISTS), size - unused

        outcome, written = self._try(run, "put", (StoreOutcome.FAILED, 0))
        if outcome is StoreOutcome.STORED:
            self._count(stored=1, bytes_written=written)
            self._notify(cid, True)
        elif outcome is StoreOutcome.EXISTS:
            self._count(already_present=1, bytes_written=written)
        elif outcome is StoreOutcome.OVER_QUOTA:
            self._count(quota_rejections=1)
        return outcome

    def delete(self, cid: ChunkId) -> bool:
        return self.delete_many([cid]) == 1

    def delete_many(self, cids: Iterable[ChunkId], timeout_s: float | None = None) -> int:
        """Deletes chunks (and their small copies) in one pipeline and gives their bytes back
        to the tenant's quota window they were counted in (found from the remaining TTL)."""
        cids = list(cids)
        if not cids:
            return 0
        now = self._clock()

        async def run(c):
            p = c.pipeline(transaction=False)
            for cid in cids:
                for key in (self.keys.chunk(cid), self.keys.small(cid)):
                    p.strlen(key)
                    p.pttl(key)
                    p.execute_command("UNLINK", key)  # single-key: the pipeline routes it
            r = await p.execute()
            refunds: dict[bytes, int] = {}
            gone = 0
            for i, cid in enumerate(cids):
                tenant = self._tenant(split_chunk_id(cid)[0])
                for j in range(2):
                    size, pttl, removed = r[6 * i + 3 * j: 6 * i + 3 * j + 3]
                    if not removed:
                        continue
                    gone += j == 0
                    stored_at = now - (self.cfg.ttl_s - max(0, pttl) / 1000.0)
                    qk = self.keys.quota(tenant, self._epoch(stored_at))
                    refunds[qk] = refunds.get(qk, 0) + size
            if refunds:
                p = c.pipeline(transaction=False)
                for qk, size in refunds.items():
                    p.decrby(qk, size)
                await p.execute()
            return [cid for i, cid in enumerate(cids) if r[6 * i + 2]]

        removed = self._try(run, "delete", [], timeout_s)
        for cid in removed:
            self._notify(cid, False)
        return len(removed)

    def evict(self, nbytes: int) -> list[ChunkId]:
        """Redis evicts (TTL, maxmemory-policy); nothing to do here."""
        return []

    # -- admin --------------------------------------------------------------------------
    def scan(self, prefix: bytes = b"", after: bytes = b"", limit: int = 0) -> Iterator[EntryInfo]:
        """Walks the deployment's keys on every master (bounded by the admin deadline);
        corrupt headers are skipped. Returns nothing when the cluster is unreachable."""
        pattern = self.keys.pattern(prefix)

        async def run(c):
            keys = [k async for k in c.scan_iter(match=pattern, count=_SCAN_COUNT) if not k.endswith(SMALL_SUFFIX)]
            p = c.pipeline(transaction=False)
            for k in keys:
                p.getrange(k, 0, fmt.HEADER.size - 1)
            return await p.execute() if keys else []

        entries = []
        for raw in self._try(run, "scan", [], self.link.timeout_s * ADMIN_DEADLINE_FACTOR):
            try:
                cid, meta, _, _ = fmt.decode_header(raw)
            except DataLoss:
                continue
            if cid.startswith(prefix) and cid > after:
                entries.append(EntryInfo(cid, meta, meta.created_s, 0))
        entries.sort(key=lambda e: e.cid)
        return iter(entries[:limit] if limit else entries)

    def delete_prefix(self, prefix: bytes) -> int:
        return self.delete_many([e.cid for e in self.scan(prefix)],
                                self.link.timeout_s * ADMIN_DEADLINE_FACTOR)

    def stats(self) -> TierStats:
        s = self.remote_stats()
        return TierStats(Medium.REMOTE, "redis-ttl", 0, s.bytes_written, s.stored,
                         s.hits, s.misses, 0, s.corrupt, 0)

    def remote_stats(self) -> RemoteStats:
        with self._lock:
            s = RemoteStats(**{f: getattr(self._s, f) for f in RemoteStats.__slots__})
        s.errors, s.fast_fails = self.link.errors, self.link.fast_fails
        s.throughput_bytes_per_s = self.meter.bytes_per_s
        return s

    def close(self) -> None:
        self.link.close()
