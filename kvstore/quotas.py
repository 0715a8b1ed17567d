"""Per-tenant quotas: typed limits and a thread-safe ledger of what each tenant holds.

Limits come from ``[quotas]`` (``QuotaConfig``, the defaults for every tenant), overridden per
tenant in ``auth.tokens.<token>.quotas`` / ``auth.certs.<identity>.quotas`` (``TenantQuotas``).
``QuotaLedger.acquire(tenant, resource, n)`` counts ``n`` units against the tenant or raises
``ResourceExhausted`` naming the quota and its config key (the daemon-wide budget of request
bytes, ``quotas.daemon_max_inflight_request_bytes``, is ``server.admission.InflightBudget``'s:
it queues streams instead of refusing them); ``release`` gives them back. The core (tiers, lease table, servicers) calls
it at the point where a tenant starts holding something and where it stops: the ledger does not
know what a lease is, only how many each tenant holds.

Threading: every method is thread-safe and O(1); one lock (``_lock``) guards the counters and is
never held while calling out, so it nests inside any caller's lock.
"""

from __future__ import annotations

import contextlib
import enum
import math
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from .config import AuthConfig, DramConfig, QuotaConfig, TenantQuotas
from .domain.errors import Internal, InvalidArgument, NotFound, ResourceExhausted


class QuotaExceeded(ResourceExhausted):
    """RESOURCE_EXHAUSTED because the tenant is at its own quota (not because the daemon or a
    tier is out of room): the chain then neither sheds other tenants' queued write-behind
    copies nor retries; a put goes to the next tier (``TierChain._spill``)."""


class Resource(str, enum.Enum):
    """What a tenant can hold; the value is the quota's field in ``[quotas]``."""

    DRAM_BYTES = "max_dram_bytes"
    DISK_BYTES = "max_disk_bytes"
    REMOTE_BYTES = "max_remote_bytes"
    PINNED_BYTES = "max_pinned_bytes"
    OPEN_LEASES = "max_open_leases"
    OPEN_RESERVATIONS = "max_open_reservations"
    RESERVED_BYTES = "max_reserved_bytes"
    CONCURRENT_STREAMS = "max_concurrent_streams"
    CONTROL_CONNECTIONS = "max_control_connections"
    NAMESPACES = "max_namespaces"
    INFLIGHT_REQUEST_BYTES = "max_inflight_request_bytes"

    @property
    def is_bytes(self) -> bool:
        return self.value.endswith("_bytes")

    def describe(self, n: int) -> str:
        """``n`` units in words, e.g. '64 open leases', '1.0 GiB of pinned chunks'."""
        words = {Resource.DRAM_BYTES: "in the DRAM tier", Resource.DISK_BYTES: "in the disk tier",
                 Resource.REMOTE_BYTES: "in the remote tier", Resource.PINNED_BYTES: "of pinned chunks",
                 Resource.RESERVED_BYTES: "of open write reservations",
                 Resource.INFLIGHT_REQUEST_BYTES: "of request data in flight",
                 Resource.OPEN_LEASES: "open leases", Resource.OPEN_RESERVATIONS: "open write reservations",
                 Resource.CONCURRENT_STREAMS: "streams in flight",
                 Resource.CONTROL_CONNECTIONS: "control-socket connections", Resource.NAMESPACES: "registered namespaces"}
        return f"{_size(n)} {words[self]}" if self.is_bytes else f"{n} {words[self]}"


#: ``dram.capacity_bytes``' default: what an unset ``max_reserved_bytes`` is half of when the
#: ledger is built without a DRAM size.
DEFAULT_DRAM_BYTES = DramConfig.model_fields["capacity_bytes"].default

#: The daemon-wide budget of in-flight request bytes (all tenants together).
DAEMON_INFLIGHT_KEY = "daemon_max_inflight_request_bytes"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    return str(n)


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """One tenant's resolved limits. ``None``: unlimited. ``overridden``: the fields its
    credential set (so messages point at the right config key)."""

    values: Mapping[Resource, int | None]
    max_pin_ttl_s: float
    max_stream_idle_s: float
    overridden: frozenset[str] = frozenset()

    def limit(self, resource: Resource) -> int | None:
        return self.values[resource]

    def key(self, field: str) -> str:
        return ("auth.tokens.<token>.quotas." if field in self.overridden else "quotas.") + field


def resolve_limits(defaults: QuotaConfig, override: TenantQuotas | None = None) -> TenantLimits:
    set_fields = frozenset(override.model_fields_set) if override is not None else frozenset()

    def pick(field: str):
        v = getattr(override, field) if field in set_fields else None
        return getattr(defaults, field) if v is None else v

    values = {r: pick(r.value) for r in Resource}
    if values[Resource.RESERVED_BYTES] is None:   # never unbounded (see ledger_from_config)
        values[Resource.RESERVED_BYTES] = DEFAULT_DRAM_BYTES // 2
    return TenantLimits(values, pick("max_pin_ttl_s"), pick("max_stream_idle_s"),
                        frozenset(f for f in set_fields if getattr(override, f) is not None))


def tenant_overrides(auth: AuthConfig) -> dict[str, TenantQuotas]:
    """Per-tenant overrides from every token and certificate entry. Entries of one tenant must
    agree (a tenant has one ledger whatever credential it uses): InvalidArgument otherwise."""
    entries = list(auth.load_tokens().values()) if auth.enabled else []
    entries += list(auth.certs.values())
    out: dict[str, TenantQuotas] = {}
    for e in entries:
        q = e.quotas
        if not q.model_fields_set:
            continue
        prev = out.setdefault(e.tenant, q)
        if prev != q:
            raise InvalidArgument(f"tenant {e.tenant!r} has credentials with different quotas; give every token "
                                  "and certificate of a tenant the same 'quotas' table")
    return out


class QuotaLedger:
    """What every tenant holds, against its limits. See the module docstring."""

    def __init__(self, defaults: QuotaConfig, overrides: Mapping[str, TenantQuotas] | None = None) -> None:
        self._defaults = defaults
        self._default_limits = resolve_limits(defaults)
        self._limits = {t: resolve_limits(defaults, q) for t, q in (overrides or {}).items()}
        self._lock = threading.Lock()
        self._held: dict[str, dict[Resource, int]] = {}

    def limits(self, tenant: str) -> TenantLimits:
        return self._limits.get(tenant, self._default_limits)

    # ------------------------------------------------------------------ counting
    def acquire(self, tenant: str, resource: Resource, n: int = 1, *, enforce: bool = True) -> None:
        """Counts ``n`` more units of ``resource`` against ``tenant``.

        Raises ResourceExhausted (nothing counted) when that would pass the tenant's quota.
        ``enforce=False`` counts without checking
        (what a restart finds already held, e.g. registered namespaces)."""
        if n < 0:
            raise Internal(f"QuotaLedger.acquire({resource.name}, n={n}): n must be >= 0")
        lim = self.limits(tenant)
        cap = lim.limit(resource)
        with self._lock:
            held = self._held.setdefault(tenant, {})
            have = held.get(resource, 0)
            if enforce and cap is not None and have + n > cap:
                raise QuotaExceeded(
                    f"tenant {tenant!r} holds {resource.describe(have)} and asked for {resource.describe(n)} more, "
                    f"over its quota ({lim.key(resource.value)}={cap}); release some first, or raise the quota")
            held[resource] = have + n

    def release(self, tenant: str, resource: Resource, n: int = 1) -> None:
        """Gives back ``n`` units; releasing more than is held is a bug of the caller (Internal)."""
        with self._lock:
            held = self._held.get(tenant, {})
            have = held.get(resource, 0)
            if n < 0 or n > have:
                raise Internal(f"QuotaLedger.release: tenant {tenant!r} holds {have} of {resource.name}, "
                               f"cannot release {n}")
            held[resource] = have - n

    @contextlib.contextmanager
    def holding(self, tenant: str, resource: Resource, n: int = 1) -> Iterator[None]:
        """``acquire`` for the duration of a ``with`` block (e.g. one stream, one request's bytes)."""
        self.acquire(tenant, resource, n)
        try:
            yield
        finally:
            self.release(tenant, resource, n)

    # ------------------------------------------------------------------ queries
    def usage(self, tenant: str) -> dict[Resource, int]:
        with self._lock:
            held = dict(self._held.get(tenant, {}))
        return {r: held.get(r, 0) for r in Resource}

    def held(self, tenant: str, resource: Resource) -> int:
        """What ``tenant`` holds of ``resource`` now (O(1))."""
        with self._lock:
            return self._held.get(tenant, {}).get(resource, 0)

    def excess(self, tenant: str, resource: Resource, n: int) -> int:
        """Units ``tenant`` must give back before ``n`` more of ``resource`` fit its quota
        (0 when they fit now or the quota is unset). A tier evicts that much of the tenant's
        own chunks before it charges a new one (``TierAccount``)."""
        cap = self.limits(tenant).limit(resource)
        if cap is None:
            return 0
        return max(0, self.held(tenant, resource) + n - cap)

    def tenants(self) -> list[str]:
        with self._lock:
            return sorted(t for t, h in self._held.items() if any(h.values()))

    def clamp_pin_ttl_s(self, tenant: str, requested_s: float) -> float:
        """The pin TTL to apply: ``requested_s`` (0 = "until unpinned") at most the tenant's
        ``max_pin_ttl_s``. A pin never outlives the quota: "until unpinned" becomes the maximum."""
        if math.isnan(requested_s) or requested_s < 0:
            raise InvalidArgument(f"pin ttl must be >= 0 seconds, got {requested_s}")
        cap = self.limits(tenant).max_pin_ttl_s
        return cap if requested_s == 0 else min(requested_s, cap)


#: Bytes of the namespace-id prefix of a chunk id (``domain.types.split_chunk_id``).
_NAMESPACE_ID_BYTES = 32


class TierAccount:
    """Charges the chunks of one tier to the tenants that own them.

    A chunk's tenant is its namespace's (a chunk id starts with its namespace id, and a
    namespace id hashes its tenant, so the mapping never changes: it is cached).
    ``tenant_of`` raises NotFound for a namespace the registry does not know; such a chunk
    is charged to nobody (``tenant`` None), as is every chunk of a tier built without a
    registry. A tier calls ``charge`` where a chunk starts occupying it (bytes as the tier
    stores them: arena extent, file, Redis value) and ``release`` with the same tenant and
    bytes where it stops; it stores the tenant on its entry so the two always agree.

    Threading: thread-safe; never calls into a tier (the ledger's lock nests inside a tier's).
    """

    def __init__(self, ledger: QuotaLedger, resource: Resource,
                 tenant_of: Callable[[bytes], str] | None) -> None:
        self.ledger = ledger
        self.resource = resource
        self._tenant_of = tenant_of
        self._cache: dict[bytes, str] = {}

    def tenant(self, cid: bytes) -> str | None:
        """The tenant owning chunk ``cid``, or None (unknown namespace, no registry)."""
        if self._tenant_of is None:
            return None
        ns = bytes(cid[:_NAMESPACE_ID_BYTES])
        t = self._cache.get(ns)
        if t is None:
            try:
                t = self._tenant_of(ns)
            except NotFound:
                return None
            self._cache[ns] = t
        return t

    def excess(self, tenant: str | None, n: int, resource: Resource | None = None) -> int:
        """Bytes of ``tenant``'s own chunks to evict before ``n`` more fit (see QuotaLedger)."""
        return 0 if tenant is None else self.ledger.excess(tenant, resource or self.resource, n)

    def charge(self, tenant: str | None, n: int, resource: Resource | None = None, *, enforce: bool = True) -> None:
        """Counts ``n`` bytes against ``tenant``; ResourceExhausted (nothing counted) naming
        the quota's key when over. No-op for tenant None."""
        if tenant is not None:
            self.ledger.acquire(tenant, resource or self.resource, n, enforce=enforce)

    def release(self, tenant: str | None, n: int, resource: Resource | None = None) -> None:
        if tenant is not None:
            self.ledger.release(tenant, resource or self.resource, n)


def ledger_from_config(quotas: QuotaConfig, auth: AuthConfig, dram_capacity_bytes: int | None = None) -> QuotaLedger:
    """The daemon's ledger: ``[quotas]`` defaults plus every credential's overrides. An unset
    ``max_reserved_bytes`` becomes half of ``dram_capacity_bytes`` (reservations are never
    unbounded: they cannot be evicted)."""
    if quotas.max_reserved_bytes is None:
        quotas = quotas.model_copy(update={"max_reserved_bytes": (dram_capacity_bytes or DEFAULT_DRAM_BYTES) // 2})
    return QuotaLedger(quotas, tenant_overrides(auth))
