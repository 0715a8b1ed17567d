"""The namespace registry: which namespaces exist, who owns them, persisted under the data dir.

A namespace's id is ``kvstore_wire.keys.Namespace(..., tenant=tenant).namespace_id``
(docs/keys.md), so the tenant is hashed into every key a caller can produce. The tenant
always comes from the caller's credential, never from a request field.

Ownership: ``get(namespace_id, tenant)`` raises NotFound both for an unknown id and for an
id owned by another tenant, so ids of other tenants never leak through error messages.

Persistence: an append-only log ``namespaces.log`` (``_RegistryLog``: one JSON line per
registration or removal, fsynced in groups), so a registration costs O(1) I/O however many
exist. It is compacted (rewritten atomically) at start when most of its lines are dead. A torn
last line (a crash mid-append) is dropped at start. A ``namespaces.json`` of format 1 (the
earlier whole-file format) is converted on first start.

Quota: each tenant may register ``quotas.max_namespaces`` (``QuotaLedger``, Resource.NAMESPACES).

Threading: every method is thread-safe; reads take no lock (they read an immutable dict
snapshot that writers replace under ``_lock``), so the request hot path never contends.
``register`` and ``remove`` do blocking file I/O (an append and an fsync): call them from a
worker thread, never on the event loop. Locks: ``_lock`` (registry state and appends) and
``RegistryLog._sync_lock`` (the fsync) are never held together: the fsync runs after ``_lock``
is released, so one slow fsync blocks neither lookups nor other registrations' appends.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from kvstore_wire.keys import KEY_BYTES, Namespace
from kvstore_wire.types import DType, Layout

from ..config import QuotaConfig
from ..quotas import QuotaLedger, Resource
from ..registry_log import RegistryLog
from .errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

REGISTRY_FILE = "namespaces.log"
#: The whole-file format of earlier versions, converted on first start.
LEGACY_REGISTRY_FILE = "namespaces.json"
_LEGACY_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    namespace_id: bytes
    namespace: Namespace  # includes the owning tenant

    @property
    def tenant(self) -> str:
        return self.namespace.tenant

    @property
    def chunk_bytes(self) -> int:
        return self.namespace.chunk_bytes()


def build_namespace(*, model: str, dtype: int, num_layers: int, num_kv_heads: int, head_dim: int,
                    layout: int = 0, tp_rank: int = 0, tp_size: int = 0, chunk_tokens: int = 0,
                    tenant: str = "") -> Namespace:
    """A validated Namespace from wire-level fields (0 = proto default where one exists).

    Raises InvalidArgument listing what to fix.
    """
    if dtype not in set(DType):
        raise InvalidArgument(f"namespace spec: dtype must be one of "
                              f"{', '.join(d.name for d in DType)}; got {dtype}")
    if layout not in (0, *set(Layout)):
        raise InvalidArgument(f"namespace spec: layout must be one of {', '.join(x.name for x in Layout)}")
    try:
        return Namespace(model=model, dtype=DType(dtype), num_layers=num_layers, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, layout=Layout(layout or Layout.LAYER_KV_TOKEN_HEAD_DIM),
                         tp_rank=tp_rank, tp_size=tp_size or 1, chunk_tokens=chunk_tokens or 256,
                         tenant=tenant)
    except ValueError as e:
        raise InvalidArgument(f"namespace spec: {e}") from None


class NamespaceRegistry:
    """Namespaces by id, persisted in ``<data_dir>/namespaces.log``.

    ``max_chunk_bytes``: a namespace whose full RAW chunk is larger is refused at
    registration, since none of its chunks could ever be stored. ``quotas``: the ledger that
    caps namespaces per tenant (default: one of the ``[quotas]`` defaults). ``fsync``: make
    each registration durable before it returns.
    """

    def __init__(self, data_dir: Path | str, max_chunk_bytes: int, *, quotas: QuotaLedger | None = None,
                 fsync: bool = True) -> None:
        self._dir = Path(data_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._max_chunk_bytes = max_chunk_bytes
        self._quotas = quotas if quotas is not None else QuotaLedger(QuotaConfig())
        self._lock = threading.Lock()
        self._log = RegistryLog(self._dir / REGISTRY_FILE, fsync=fsync)
        records = self._log.load()
        legacy = self._dir / LEGACY_REGISTRY_FILE
        if not records and legacy.exists():
            records = _read_legacy(legacy)
        by_id = _replay(records)
        dead_lines = len(records) - len(by_id)
        if legacy.exists() or dead_lines > max(len(by_id), _COMPACT_MIN_DEAD):
            self._log.rewrite([_record(i.namespace) for i in by_id.values()])
            if legacy.exists():
                legacy.rename(legacy.with_suffix(".json.converted"))
        for info in by_id.values():
            self._quotas.acquire(info.tenant, Resource.NAMESPACES, enforce=False)
        self._by_id: dict[bytes, NamespaceInfo] = by_id

    # ----------------------------------------------------------------- queries (lock-free)
    def get(self, namespace_id: bytes, tenant: str | None) -> NamespaceInfo:
        """The namespace, if it exists and ``tenant`` owns it (``None``: any tenant, for admins
        and for auth-off daemons). NotFound otherwise, with the same message in both cases."""
        info = self._by_id.get(bytes(namespace_id))
        if info is None or (tenant is not None and info.tenant != tenant):
            if len(namespace_id) != KEY_BYTES:
                raise InvalidArgument(f"namespace_id must be {KEY_BYTES} bytes, got {len(namespace_id)}")
            raise NotFound(f"namespace {bytes(namespace_id).hex()[:16]}... is not registered for this "
                           "tenant; call RegisterNamespace first (the client does this on connect)")
        return info

    def list(self, tenant: str | None = None) -> list[NamespaceInfo]:
        infos = self._by_id.values()
        return sorted((i for i in infos if tenant is None or i.tenant == tenant),
                      key=lambda i: (i.tenant, i.namespace.model, i.namespace_id))

    def __len__(self) -> int:
        return len(self._by_id)

    @property
    def quotas(self) -> QuotaLedger:
        """The ledger counting namespaces per tenant (shared with the rest of the daemon)."""
        return self._quotas

    # ----------------------------------------------------------------- changes (blocking I/O)
    def register(self, namespace: Namespace) -> NamespaceInfo:
        """Registers (idempotently) ``namespace``; its ``tenant`` must already be the caller's.

        BLOCKING: appends one line to the log and waits for its (group) fsync; run it in a
        worker thread. Raises InvalidArgument for a namespace too large to store and
        ResourceExhausted over ``quotas.max_namespaces``."""
        if namespace.chunk_bytes() > self._max_chunk_bytes:
            raise InvalidArgument(
                f"a full chunk of this namespace is {namespace.chunk_bytes()} bytes, above the daemon's "
                f"server.max_chunk_bytes={self._max_chunk_bytes}; lower chunk_tokens or raise the limit")
        info = NamespaceInfo(bytes(namespace.namespace_id), namespace)
        with self._lock:
            known = self._by_id.get(info.namespace_id)
            if known is None:
                self._quotas.acquire(namespace.tenant, Resource.NAMESPACES)
                try:
                    seq = self._log.append(_record(namespace))
                except BaseException:
                    self._quotas.release(namespace.tenant, Resource.NAMESPACES)
                    raise
                new = dict(self._by_id)
                new[info.namespace_id] = info
                self._by_id = new
            else:
                seq = self._log.appended_seq
        self._log.sync(seq)  # an idempotent repeat also waits until the first one is durable
        if known is not None:
            return known
        log.info("registered namespace %s (model %s, tenant %r)", info.namespace_id.hex()[:16],
                 namespace.model, namespace.tenant)
        return info

    def remove(self, namespace_ids: Iterable[bytes]) -> int:
        """Removes namespaces (unknown ids are skipped); returns how many. BLOCKING like ``register``."""
        ids = [bytes(i) for i in namespace_ids]
        with self._lock:
            new = dict(self._by_id)
            gone = [info for i in ids if (info := new.pop(i, None)) is not None]
            seq = self._log.appended_seq
            for info in gone:
                seq = self._log.append({"op": "del", "id": info.namespace_id.hex()})
                self._quotas.release(info.tenant, Resource.NAMESPACES)
            self._by_id = new
        self._log.sync(seq)
        return len(gone)

    def remove_tenant(self, tenant: str) -> list[NamespaceInfo]:
        """Removes every namespace of ``tenant`` and returns them (their chunks are the caller's to delete)."""
        gone = self.list(tenant)
        self.remove(i.namespace_id for i in gone)
        return gone

    def close(self) -> None:
        self._log.close()


#: Dead log lines tolerated before a start compacts the log (a small log is never rewritten).
_COMPACT_MIN_DEAD = 1024


def _record(ns: Namespace) -> dict:
    return {"op": "add", "model": ns.model, "dtype": int(ns.dtype), "num_layers": ns.num_layers,
            "num_kv_heads": ns.num_kv_heads, "head_dim": ns.head_dim, "layout": int(ns.layout),
            "tp_rank": ns.tp_rank, "tp_size": ns.tp_size, "chunk_tokens": ns.chunk_tokens, "tenant": ns.tenant}


def _replay(records: list[dict]) -> dict[bytes, NamespaceInfo]:
    by_id: dict[bytes, NamespaceInfo] = {}
    for rec in records:
        if rec.get("op") == "del":
            by_id.pop(bytes.fromhex(rec["id"]), None)
        else:
            info = _info(rec)
            by_id[info.namespace_id] = info
    return by_id


def _info(rec: dict) -> NamespaceInfo:
    fields = {k: v for k, v in rec.items() if k != "op"}
    ns = Namespace(**{**fields, "dtype": DType(fields["dtype"]), "layout": Layout(fields["layout"])})
    return NamespaceInfo(bytes(ns.namespace_id), ns)


def _read_legacy(path: Path) -> list[dict]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"namespace registry {path} is unreadable ({e}); restore it from a "
                              "backup or move it away (clients re-register their namespaces)") from None
    if raw.get("version") != _LEGACY_FORMAT_VERSION:
        raise InvalidArgument(f"namespace registry {path} has version {raw.get('version')!r}, "
                              f"this daemon reads version {_LEGACY_FORMAT_VERSION}")
    return [{"op": "add", **rec} for rec in raw.get("namespaces", [])]
