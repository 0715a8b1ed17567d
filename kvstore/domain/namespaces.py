"""The namespace registry: which namespaces exist, who owns them, persisted under the data dir.

A namespace's id is ``kvstore_wire.keys.Namespace(..., tenant=tenant).namespace_id``
(docs/keys.md), so the tenant is hashed into every key a caller can produce. The tenant
always comes from the caller's credential, never from a request field.

Ownership: ``get(namespace_id, tenant)`` raises NotFound both for an unknown id and for an
id owned by another tenant, so ids of other tenants never leak through error messages.

Persistence: one JSON file, rewritten atomically (write to a temp file, fsync, rename,
fsync the directory) on every change. Registrations are rare (once per engine start), so
a whole-file rewrite costs nothing that matters.

Threading: every method is thread-safe; reads take no lock (they read an immutable dict
snapshot that writers replace under ``_lock``), so the request hot path never contends.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from kvstore_wire.keys import KEY_BYTES, Namespace
from kvstore_wire.types import DType, Layout

from .errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

REGISTRY_FILE = "namespaces.json"
_FORMAT_VERSION = 1


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
    """Namespaces by id, persisted as ``<data_dir>/namespaces.json``.

    ``max_chunk_bytes``: a namespace whose full RAW chunk is larger is refused at
    registration, since none of its chunks could ever be stored.
    """

    def __init__(self, data_dir: Path | str, max_chunk_bytes: int) -> None:
        self._dir = Path(data_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._path = self._dir / REGISTRY_FILE
        self._max_chunk_bytes = max_chunk_bytes
        self._lock = threading.Lock()
        self._by_id: dict[bytes, NamespaceInfo] = self._load()

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

    # ----------------------------------------------------------------- changes
    def register(self, namespace: Namespace) -> NamespaceInfo:
        """Registers (idempotently) ``namespace``; its ``tenant`` must already be the caller's."""
        if namespace.chunk_bytes() > self._max_chunk_bytes:
            raise InvalidArgument(
                f"a full chunk of this namespace is {namespace.chunk_bytes()} bytes, above the daemon's "
                f"server.max_chunk_bytes={self._max_chunk_bytes}; lower chunk_tokens or raise the limit")
        info = NamespaceInfo(bytes(namespace.namespace_id), namespace)
        with self._lock:
            if info.namespace_id in self._by_id:
                return self._by_id[info.namespace_id]
            new = dict(self._by_id)
            new[info.namespace_id] = info
            self._save(new.values())
            self._by_id = new
        log.info("registered namespace %s (model %s, tenant %r)", info.namespace_id.hex()[:16],
                 namespace.model, namespace.tenant)
        return info

    def remove(self, namespace_ids: Iterable[bytes]) -> int:
        with self._lock:
            new = dict(self._by_id)
            n = sum(1 for i in namespace_ids if new.pop(bytes(i), None) is not None)
            if n:
                self._save(new.values())
                self._by_id = new
        return n

    def remove_tenant(self, tenant: str) -> list[NamespaceInfo]:
        """Removes every namespace of ``tenant`` and returns them (their chunks are the caller's to delete)."""
        gone = self.list(tenant)
        self.remove(i.namespace_id for i in gone)
        return gone

    # ----------------------------------------------------------------- persistence
    def _load(self) -> dict[bytes, NamespaceInfo]:
        try:
            raw = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"namespace registry {self._path} is unreadable ({e}); restore it from a "
                                  "backup or move it away (clients re-register their namespaces)") from None
        if raw.get("version") != _FORMAT_VERSION:
            raise InvalidArgument(f"namespace registry {self._path} has version {raw.get('version')!r}, "
                                  f"this daemon reads version {_FORMAT_VERSION}")
        out: dict[bytes, NamespaceInfo] = {}
        for rec in raw.get("namespaces", []):
            ns = Namespace(**{**rec, "dtype": DType(rec["dtype"]), "layout": Layout(rec["layout"])})
            nid = bytes(ns.namespace_id)
            out[nid] = NamespaceInfo(nid, ns)
        return out

    def _save(self, infos: Iterable[NamespaceInfo]) -> None:
        records = []
        for i in infos:
            ns = i.namespace
            records.append({"model": ns.model, "dtype": int(ns.dtype), "num_layers": ns.num_layers,
                            "num_kv_heads": ns.num_kv_heads, "head_dim": ns.head_dim, "layout": int(ns.layout),
                            "tp_rank": ns.tp_rank, "tp_size": ns.tp_size, "chunk_tokens": ns.chunk_tokens,
                            "tenant": ns.tenant})
        data = json.dumps({"version": _FORMAT_VERSION, "namespaces": records}, indent=1).encode()
        tmp = self._path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._path)
        dfd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
