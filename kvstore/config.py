"""Typed, validated configuration: one object per concern, unknown keys rejected.

Sources, later ones winning: defaults < TOML file (``--config``) < environment
(``KVSTORE_<SECTION>__<FIELD>``, e.g. ``KVSTORE_DRAM__CAPACITY_BYTES=8GiB``) < command-line
overrides (``--set dram.capacity_bytes=8GiB``). Byte sizes accept integers or strings with a
binary/decimal unit (``512MiB``, ``2GB``); durations are seconds.
"""

from __future__ import annotations

import enum
import errno
import os
import re
import socket
import tempfile
import tomllib
from pathlib import Path
from typing import Annotated, Any, Mapping

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .domain.errors import InvalidArgument
from .domain.types import Medium

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a byte size must be a number, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a byte size; write e.g. 4096, '512MiB' or '2GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


Bytes = Annotated[int, BeforeValidator(parse_bytes), Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False, validate_default=True)


class EvictionPolicy(str, enum.Enum):
    """Which chunk a full tier gives up first."""

    LRU = "lru"        #: least recently used
    S3FIFO = "s3fifo"  #: scan-resistant: small probationary FIFO + main FIFO + ghost queue


class TierCodec(str, enum.Enum):
    """How a tier stores chunks: RAW tensor bytes or a codec bitstream (docs/bitstream.md).
    Quality per level is measured in docs/benchmarks.md (Codec)."""

    RAW = "raw"
    LOSSLESS = "lossless"            #: bit-exact
    NEAR_LOSSLESS = "near-lossless"  #: lossy, closest to exact
    DEFAULT = "default"              #: lossy, the size/quality balance
    AGGRESSIVE = "aggressive"        #: lossy, smallest


def check_host_port(addr: str) -> tuple[str, int]:
    """(host, port) of ``host:port`` / ``[v6]:port``; ValueError unless the port is 1-65535."""
    m = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\s\[\]]+):([0-9]+)", addr)
    if not m:
        raise ValueError(f"{addr!r} is not host:port (or unix:/path), e.g. 127.0.0.1:50051")
    port = int(m.group(2))
    if not MIN_PORT <= port <= MAX_PORT:
        raise ValueError(f"port {port} in {addr!r} is outside {MIN_PORT}-{MAX_PORT}")
    return m.group(1).strip("[]"), port


MIN_PORT, MAX_PORT = 1, 65535


class ServerConfig(_Section):
    #: Addresses to serve on: ``host:port`` (TCP) or ``unix:/path/to.sock``. Loopback by default.
    listen: list[str] = ["127.0.0.1:50051"]
    #: Largest gRPC message accepted or sent. Chunk payloads travel in pieces below this.
    max_message_bytes: Bytes = 16 * 1024**2
    #: Size of the data pieces a Get stream sends (and the client sends on Put).
    stream_piece_bytes: Bytes = 1024**2
    #: Largest payload of one chunk accepted on Put (guards memory against hostile headers).
    max_chunk_bytes: Bytes = 256 * 1024**2
    #: Most keys in one Lookup/Exists/Get/Delete request.
    max_keys_per_request: int = Field(4096, ge=1)
    #: Worker threads for blocking work (disk reads, large copies, checksums).
    worker_threads: int = Field(4, ge=1, le=256)
    #: Seconds a same-host lease (LocalData read lease or write reservation) lives unless
    #: released; a client that dies mid-transfer leaks its extents for at most this long.
    lease_ttl_s: float = Field(30.0, gt=0, le=3600)
    #: Most leases and reservations open at once across all local clients.
    max_open_leases: int = Field(4096, ge=1)
    #: Codec of chunks a client asks to receive encoded (GetRequest.encoding = CODEC) when
    #: they are stored RAW.
    network_codec: TierCodec = TierCodec.LOSSLESS
    #: Seconds in-flight RPCs get to finish on shutdown.
    shutdown_grace_s: float = Field(5.0, ge=0)
    #: TLS on every TCP listener (unix sockets stay plaintext: file permissions guard them).
    tls: "TlsConfig" = Field(default_factory=lambda: TlsConfig())

    # -- daemon-wide admission control (docs/security.md, "Admission control"); every
    # per-tenant limit, the stream idle deadline and the in-flight byte budgets are in [quotas]
    #: Seconds a Put stream waits for daemon-wide in-flight room
    #: (``quotas.daemon_max_inflight_request_bytes``) before it is refused.
    inflight_wait_s: float = Field(5.0, ge=0, le=600)
    #: Most Put and Get streams open at once, daemon-wide (all tenants; per tenant:
    #: ``quotas.max_concurrent_streams``); more are refused at once.
    max_concurrent_streams: int = Field(64, ge=1)
    #: The same-host control socket: a unix socket beside the shared arena on which same-host
    #: clients send the LocalData calls of their hot path (ReserveWrite, CommitWrite,
    #: LeaseRead, Release) as length-prefixed protobuf frames, without gRPC's per-call cost
    #: (docs/local-path.md). A client reaches it only with the ticket its Attach returned.
    local_control: bool = True
    #: Control-socket connections open at once, daemon-wide (per tenant:
    #: ``quotas.max_control_connections``); more are refused at once.
    max_control_connections: int = Field(1024, ge=1)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("listen needs at least one address")
        for a in v:
            if a.startswith("unix:"):
                if len(a) == len("unix:"):
                    raise ValueError("unix: needs a socket path, e.g. unix:/run/kvstore/kvstore.sock")
                continue
            check_host_port(a)
        if len(set(v)) != len(v):
            raise ValueError(f"listen names an address twice: {v}")
        return v

    @model_validator(mode="after")
    def _check_piece(self) -> "ServerConfig":
        if self.stream_piece_bytes + 4096 > self.max_message_bytes:
            raise ValueError("stream_piece_bytes must be at least 4 KiB below max_message_bytes")
        return self

# ---------------------------------------------------------------------------------- tenant boundary
# (issue 8: TLS, client-certificate identities, per-tenant quotas; kvstore.quotas enforces them)


class TlsConfig(_Section):
    """``[server.tls]``: PEM files for TLS on TCP listeners, optionally mutual (client certificates).

    TLS is on when ``cert_file`` is set. ``client_ca_file`` makes the daemon ask for (and with
    ``require_client_cert`` insist on) a client certificate signed by that CA; a verified
    certificate's identity maps to a tenant through ``auth.certs``.
    """

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    require_client_cert: bool = False

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _check_pair(self) -> "TlsConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file needs cert_file/key_file (mutual TLS is TLS first)")
        if self.require_client_cert and self.client_ca_file is None:
            raise ValueError("require_client_cert needs client_ca_file (the CA that signs client certificates)")
        return self


class TenantQuotas(_Section):
    """Per-tenant overrides of ``[quotas]`` (``auth.tokens.<t>.quotas``, ``auth.certs.<id>.quotas``);
    a field left unset takes the ``[quotas]`` value. Field meanings: see ``QuotaConfig``."""

    max_dram_bytes: Bytes | None = None
    max_disk_bytes: Bytes | None = None
    max_remote_bytes: Bytes | None = None
    max_pinned_bytes: Bytes | None = None
    max_pin_ttl_s: float | None = Field(None, gt=0)
    max_open_leases: int | None = Field(None, ge=0)
    max_open_reservations: int | None = Field(None, ge=0)
    max_reserved_bytes: Bytes | None = None
    max_concurrent_streams: int | None = Field(None, ge=0)
    max_control_connections: int | None = Field(None, ge=0)
    max_namespaces: int | None = Field(None, ge=0)
    max_inflight_request_bytes: Bytes | None = None
    max_stream_idle_s: float | None = Field(None, gt=0)


class QuotaConfig(_Section):
    """``[quotas]``: what one tenant may hold at once (defaults for every tenant).

    The DRAM and disk byte quotas (``max_dram_bytes``, ``max_disk_bytes``) are unset by
    default: those tiers are caches shared by eviction, so another tenant's chunks only cost a
    tenant hit rate, never a failed request. Set, they are charged in the tier (bytes as
    stored) and a tenant at its quota evicts its own chunks first. What a tenant can hold
    *unevictably* (pins, reservations, leases, streams, request bytes) and its bytes in the
    remote cluster (evicted by TTL only) are always bounded. Over a quota a request fails
    with RESOURCE_EXHAUSTED naming the quota's key.
    """

    #: Bytes of the DRAM tier one tenant's chunks may occupy; unset: the whole tier.
    max_dram_bytes: Bytes | None = None
    #: Bytes of the disk tier one tenant's chunks may occupy; unset: the whole tier.
    max_disk_bytes: Bytes | None = None
    #: Bytes one tenant may hold in the remote tier's cluster (live bytes, counted in Redis
    #: per TTL window across every sidecar); a store over it is skipped and counted. Set by
    #: default: Redis evicts only by TTL, so an unbounded tenant could fill the cluster.
    max_remote_bytes: Bytes | None = 64 * 1024**3
    #: Bytes a tenant may keep pinned through Lookup(pin_ttl_s=...) at once (counted at the
    #: namespace's raw chunk size).
    max_pinned_bytes: Bytes = 256 * 1024**2
    #: Longest pin a tenant may ask for; longer requests are clamped to this.
    max_pin_ttl_s: float = Field(60.0, gt=0, le=86400)
    #: Same-host read leases (LeaseRead answers with a lease id) a tenant may hold open at once.
    max_open_leases: int = Field(1024, ge=0)
    #: Same-host write reservations (reserved, uncommitted slots) a tenant may hold open at once.
    max_open_reservations: int = Field(1024, ge=0)
    #: Arena bytes a tenant's open same-host write reservations (uncommitted, unevictable)
    #: may cover at once; unset: half of ``dram.capacity_bytes``, so one tenant's
    #: reservations can never take the whole arena from the others.
    max_reserved_bytes: Bytes | None = None
    #: Streaming RPCs (Put, Get) a tenant may have in flight at once.
    max_concurrent_streams: int = Field(256, ge=0)
    #: Same-host control-socket connections a tenant may hold open at once
    #: (``server.local_control``; each client keeps one).
    max_control_connections: int = Field(64, ge=0)
    #: Namespaces a tenant may register.
    max_namespaces: int = Field(1024, ge=0)
    #: Request bytes of one tenant buffered in the daemon at once (Put payloads received, not
    #: yet stored); over it a Put is refused at once.
    max_inflight_request_bytes: Bytes = 512 * 1024**2
    #: Request bytes of all tenants together buffered in the daemon at once (daemon-wide, no
    #: per-token override). A Put over it stops reading for up to ``server.inflight_wait_s``,
    #: then RESOURCE_EXHAUSTED. At least ``server.max_chunk_bytes + server.max_message_bytes``.
    daemon_max_inflight_request_bytes: Bytes = 1024**3
    #: Seconds a stream may make no progress before the daemon cancels it with
    #: DEADLINE_EXCEEDED and frees what it held: a Put (or any request stream) that sends no
    #: message, a Get (any response stream) whose client takes none. The one idle deadline.
    max_stream_idle_s: float = Field(30.0, gt=0, le=3600)


def _check_trust(entry):
    if entry.trust_client_crc and not entry.local_path:
        raise ValueError("trust_client_crc = true needs local_path = true (it applies to same-host commits)")
    return entry


class CertEntry(_Section):
    """``auth.certs.<identity>``: who a verified client certificate is. The identity is the
    certificate's subject CN or one of its SAN entries (DNS name or URI, e.g. a SPIFFE id)."""

    tenant: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    admin: bool = False
    local_path: bool = False
    #: As ``TokenEntry.trust_client_crc``.
    trust_client_crc: bool = False
    quotas: TenantQuotas = TenantQuotas()

    @model_validator(mode="after")
    def _trust_needs_local(self):
        return _check_trust(self)

# ---------------------------------------------------------------------------------- end tenant boundary


class TokenEntry(_Section):
    tenant: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    #: May call the Admin service.
    admin: bool = False
    #: May use the same-host shared-memory path. The arena and presence index hold every
    #: tenant's chunks, so grant this only to the co-located engine trusted with all of them;
    #: other tokens use the stream path, where the tenant check applies to every request.
    local_path: bool = False
    #: CommitWrite publishes this principal's same-host extents with the CRC32C it sent,
    #: without the daemon re-reading every byte (the GPU data path computes them on the GPU;
    #: the re-read is one CPU pass over each chunk). Off by default: with it on, the
    #: stale-bytes guarantee for this principal's writes rests on the client (docs/security.md).
    #: Needs ``local_path``.
    trust_client_crc: bool = False
    #: Overrides of ``[quotas]`` for this token's tenant (every token of a tenant must agree).
    quotas: TenantQuotas = TenantQuotas()

    @model_validator(mode="after")
    def _trust_needs_local(self):
        return _check_trust(self)


class AuthConfig(_Section):
    """Shared-secret bearer tokens (``authorization: Bearer <token>`` metadata).

    With no tokens configured, auth is off: every caller is the tenant ``""`` with admin
    rights, which is only safe on loopback or a unix socket (the daemon refuses a
    non-loopback TCP listener without auth unless ``allow_insecure_remote`` is set).
    """

    #: token -> who it is. Prefer ``tokens_file`` so secrets stay out of the main config.
    tokens: dict[str, TokenEntry] = {}
    #: TOML file with a ``[tokens]`` table of the same shape.
    tokens_file: Path | None = None
    #: verified client-certificate identity (subject CN, SAN DNS or SAN URI) -> who it is.
    #: Needs ``server.tls.client_ca_file``.
    certs: dict[str, CertEntry] = {}
    #: Allow a non-loopback TCP listener without tokens (anyone who can connect is admin).
    allow_insecure_remote: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.tokens) or self.tokens_file is not None or bool(self.certs)

    def load_tokens(self) -> dict[str, TokenEntry]:
        tokens = dict(self.tokens)
        if self.tokens_file is not None:
            raw = tomllib.loads(Path(self.tokens_file).read_text())
            extra = set(raw) - {"tokens"}
            if extra:
                raise InvalidArgument(f"{self.tokens_file}: unknown keys {sorted(extra)}; only [tokens] is allowed")
            for tok, entry in raw.get("tokens", {}).items():
                tokens[tok] = TokenEntry.model_validate(entry)
        for tok in tokens:
            if len(tok) < 16:
                raise InvalidArgument("auth tokens must be at least 16 characters; generate one with "
                                      "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        return tokens


class DramConfig(_Section):
    #: Size of the host arena, allocated once at start.
    capacity_bytes: Bytes = 1024**3
    #: Which chunk a full arena gives up first.
    policy: EvictionPolicy = EvictionPolicy.S3FIFO
    #: How chunks are held in DRAM. RAW keeps the same-host path a plain copy; a codec holds
    #: more chunks in the same arena, decoded by the reader.
    codec: TierCodec = TierCodec.RAW
    #: Allocation granule of the arena; chunks occupy whole pages.
    page_bytes: Bytes = 64 * 1024
    #: Zero freed pages in a background thread and hand same-host writers cleared pages first,
    #: so a ReserveWrite skips its zeroing pass (a page another chunk held is never handed to
    #: a client uncleared either way). False: each ReserveWrite zeroes what it takes.
    clear_freed: bool = True
    #: Keep this many bytes of the arena free (the clearer evicts by policy ahead of need and
    #: clears them), so same-host writes into a full arena find cleared room at once. 0: only
    #: pages freed by deletes and evictions are cleared. Needs ``clear_freed``.
    free_target_bytes: Bytes = 0
    #: Back the arena with a shared-memory file ``/dev/shm/<shm_name>`` that local clients map
    #: (the zero-copy same-host path). ``auto``: ``kvstore-<pid>.arena``, falling back to a
    #: private arena when /dev/shm has no room. Empty: a private (anonymous) arena, so local
    #: clients use the gRPC stream path. The file is mode 0600: only processes of the
    #: daemon's user can map it.
    shm_name: str = "auto"
    #: Buckets (8 chunks each) of the presence index published beside a shared arena, which
    #: lets same-host clients look up prefixes without an RPC. A power of two; 0 disables it.
    #: The default (65536 buckets, 4 MiB) indexes about 260,000 chunks at half load.
    presence_buckets: int = Field(65536, ge=0)

    @field_validator("presence_buckets")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"{v} is not a power of two (or 0 to disable the index)")
        return v


class DiskConfig(_Section):
    #: Keep a disk tier (chunks survive restarts). The namespace registry lives in ``path`` either way.
    enabled: bool = True
    #: Directory holding chunk files and the LMDB index. Created if missing.
    path: Path = Path("./kvstore-data")
    #: Byte budget of the chunk files; the policy evicts beyond it.
    capacity_bytes: Bytes = 16 * 1024**3
    #: Which chunk a full disk tier gives up first.
    policy: EvictionPolicy = EvictionPolicy.LRU
    #: How chunks are written to disk (encoded by the writer thread, off the request path).
    codec: TierCodec = TierCodec.RAW
    #: Chunks waiting to be written; when full, MEMORY-durability writes to disk are dropped
    #: (and counted) rather than blocking the request path.
    write_queue_chunks: int = Field(256, ge=1)
    #: fsync chunk files and the index before a PERSISTED put is acknowledged.
    fsync: bool = True
    #: Initial LMDB index map (metadata only; chunk bytes live in files). A full map is grown
    #: (doubled) as needed; raise this only if growth fails.
    index_map_bytes: Annotated[Bytes, Field(ge=64 * 1024)] = 1024**3
    #: Background verification of cold chunk files (header + CRC32C) in bytes per second;
    #: 0 turns it off. ``kvctl verify`` checks everything on demand.
    scrub_bytes_per_s: Bytes = 4 * 1024**2


class HbmConfig(_Section):
    """The GPU HBM tier: used only when ``chain.tiers`` names ``"hbm"`` (put it first, e.g.
    ``["hbm", "dram", "disk"]``). A host without a CUDA device then refuses to start, naming
    ``chain.tiers``; without ``"hbm"`` in the chain nothing CUDA is loaded."""

    #: Byte budget of the daemon's GPU pool, allocated once (one ``cudaMalloc``) at start.
    #: Eviction demotes chunks to the next tier down the chain.
    capacity_bytes: Bytes = 4 * 1024**3
    #: CUDA device ordinal (as this daemon's ``CUDA_VISIBLE_DEVICES`` numbers them) holding the pool.
    device: int = Field(0, ge=0)


class WriteMode(str, enum.Enum):
    """How a put reaches the next tier down the chain."""

    WRITE_THROUGH = "write-through"  #: on the caller's thread, before the put returns
    WRITE_BEHIND = "write-behind"    #: queued (bounded); a writer thread copies it later


def _medium(value: Any) -> Medium:
    if isinstance(value, Medium):
        return value
    try:
        m = Medium[str(value).upper()]
    except KeyError:
        m = None
    if m is None or m == Medium.NONE:
        names = ", ".join(repr(x.name.lower()) for x in Medium if x != Medium.NONE)
        raise ValueError(f"{value!r} is not a tier; use one of {names}")
    return m


TierName = Annotated[Medium, BeforeValidator(_medium)]


class ChainConfig(_Section):
    """The tier chain: which tiers, fastest first, and how chunks move between them.

    Each tier keeps its own section (``[dram]``, ``[disk]``, ...). A tier listed here whose
    section says ``enabled = false`` is left out, so ``disk.enabled = false`` still means
    "DRAM only".
    """

    #: Tiers fastest first. Lookups walk them in this order.
    tiers: list[TierName] = [Medium.DRAM, Medium.DISK]
    #: How a MEMORY-durability put reaches each lower tier. PERSISTED puts are always written
    #: through to the first durable tier before they are acknowledged.
    write_mode: WriteMode = WriteMode.WRITE_BEHIND
    #: Per lower tier overrides of ``write_mode``, e.g. ``{disk = "write-through"}``.
    link_write_mode: dict[TierName, WriteMode] = {}
    #: Copy a chunk found in a lower tier into the faster tiers above it.
    promote_on_hit: bool = True
    #: Write-behind bound in bytes, as a fraction of the upper tier's capacity: queued copies
    #: hold read leases on their chunks there, at most this much (0.5 of a 256 MiB arena:
    #: 128 MiB, 21 SmolLM2 6 MB chunks). A copy beyond it is skipped and counted
    #: (``write_queue_dropped``). The chunk count ``disk.write_queue_chunks`` bounds it too.
    #: When a foreground write finds no room, queued copies give their leases back first.
    write_behind_fraction: float = Field(0.5, gt=0.0, le=0.9)

    @field_validator("tiers")
    @classmethod
    def _check_tiers(cls, v: list[Medium]) -> list[Medium]:
        if not v:
            raise ValueError("the chain needs at least one tier, e.g. ['dram']")
        if len(set(v)) != len(v):
            raise ValueError("a tier may appear only once in the chain")
        return v


class MetricsConfig(_Section):
    #: ``host:port`` for the Prometheus exporter; empty disables it.
    listen: str = "127.0.0.1:9400"

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        if v:
            check_host_port(v)
        return v


class LogConfig(_Section):
    #: DEBUG, INFO, WARNING, ERROR or CRITICAL.
    level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    #: One JSON object per log line instead of text.
    json_lines: bool = False


# --- Remote tier (Redis Cluster) and KV events (issue 11) ---------------------------------

#: Codec levels from best to worst quality; ``RemoteConfig.min_quality`` forbids the ones after it.
CODEC_QUALITY_ORDER = (TierCodec.LOSSLESS, TierCodec.NEAR_LOSSLESS, TierCodec.DEFAULT, TierCodec.AGGRESSIVE)


class RemoteConfig(_Section):
    """The shared remote tier: compressed KV bitstreams in a Redis Cluster (docs/remote.md)."""

    #: Use the remote tier: it joins the chain as its last level (or where ``chain.tiers``
    #: lists ``"remote"``); local misses are filled from it, local puts are uploaded to it.
    enabled: bool = False
    #: Seed nodes ``host:port`` of the Redis Cluster; the client discovers the rest.
    nodes: list[str] = ["127.0.0.1:7000"]
    #: Rewrites node addresses of the cluster's slot map, ``{"10.0.0.5:7000" = "nat-host:17000"}``
    #: (NAT, or a harness's throttling proxy); empty: addresses as the cluster announces them.
    address_map: dict[str, str] = {}
    #: Redis ACL user and password (AUTH); empty: no AUTH.
    username: str = ""
    #: Redis AUTH password (with ``username``: an ACL user). Prefer the environment variable
    #: ``KVSTORE_REMOTE__PASSWORD`` to keep it out of config files.
    password: str = ""
    #: TLS to the cluster; the CA/cert/key paths are optional (system CAs by default).
    tls: bool = False
    #: PEM CA of the cluster's certificates (with ``tls``; the system CAs when unset).
    tls_ca_file: Path | None = None
    #: PEM client certificate for Redis servers that require one.
    tls_cert_file: Path | None = None
    #: PEM key of ``tls_cert_file``.
    tls_key_file: Path | None = None
    #: Cluster-wide secret every sidecar shares: Redis keys are HMAC(secret, namespace) salted,
    #: so nobody without it can compute another tenant's keys from token ids. At least 16 chars.
    key_secret: str = Field("change-me-kvstore-remote-secret", min_length=16)
    #: Prefix of every key this deployment writes (several deployments may share a cluster).
    key_prefix: str = Field("kvs", pattern=r"^[A-Za-z0-9._-]{1,32}$")
    #: Deadline of every remote operation, end to end (connect, retries and redirects
    #: included): slower -> the call is a miss/skip, counted in ``errors``.
    timeout_ms: int = Field(200, ge=1, le=60_000)
    #: Connections per cluster node in the pool.
    max_connections_per_node: int = Field(32, ge=1, le=4096)
    #: Lifetime of a stored value in Redis (renewed by nothing: chunks are immutable).
    ttl_s: int = Field(24 * 3600, ge=1)
    #: Best-quality-first floor: levels of lower quality than this are never stored or sent.
    #: ``lossless`` forbids every lossy level.
    min_quality: TierCodec = TierCodec.AGGRESSIVE
    #: Pin one codec level for uploads instead of the adaptive choice (no small companion);
    #: ignored when the floor forbids it. Unset: adaptive.
    fixed_level: TierCodec | None = None
    #: Load-time budget per token the adaptive controller plans for (transfer time of a
    #: chunk at the measured throughput, divided by its tokens).
    load_budget_us_per_token: float = Field(20.0, gt=0)
    #: Also store a small (lowest allowed quality) copy beside a better-quality primary,
    #: so a reader on a slower link than the uploader's can still load within budget.
    small_companion: bool = True
    #: Throughput assumed before any transfer was measured (bytes/s); 1.25e9 = 10 Gbit/s.
    initial_throughput_bytes_per_s: float = Field(1.25e9, gt=0)
    #: Weight of the newest sample in the throughput EWMA (0..1].
    throughput_ewma_alpha: float = Field(0.2, gt=0, le=1)
    #: Upload queue; when full, uploads are skipped and counted.
    upload_queue_chunks: int = Field(1024, ge=1)
    #: Chunks per upload batch (one existence check per batch).
    upload_batch_chunks: int = Field(32, ge=1, le=4096)
    #: Wait after a failed batch before the uploader tries again (Redis down).
    retry_backoff_s: float = Field(0.5, gt=0, le=60)

    @field_validator("nodes")
    @classmethod
    def _check_nodes(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("remote.nodes needs at least one host:port")
        for a in v:
            if not re.fullmatch(r"[^:\s]+:[0-9]{1,5}", a):
                raise ValueError(f"{a!r} is not host:port")
        return v

    @field_validator("address_map")
    @classmethod
    def _check_map(cls, v: dict[str, str]) -> dict[str, str]:
        for a in [*v, *v.values()]:
            if not re.fullmatch(r"[^:\s]+:[0-9]{1,5}", a):
                raise ValueError(f"remote.address_map: {a!r} is not host:port")
        return v

    @field_validator("min_quality")
    @classmethod
    def _check_floor(cls, v: TierCodec) -> TierCodec:
        if v == TierCodec.RAW:
            raise ValueError("min_quality is a codec level (lossless, near-lossless, default, aggressive)")
        return v


class EventEncoding(str, enum.Enum):
    """How KV event structs are laid out in msgpack (docs/events.md)."""

    ARRAY = "array"  #: positional arrays, tag first (vLLM <= 0.11, llm-d, AIBrix, production stack)
    MAP = "map"      #: maps with a ``type`` tag key (vLLM after array_like was dropped)


class EventsConfig(_Section):
    """KV events for cache-aware routers over ZMQ, in vLLM's KV-events format (docs/events.md)."""

    #: Publish chunk stored/removed events per medium (DRAM, disk, remote).
    enabled: bool = False
    #: PUB socket: ``tcp://*:5557`` binds; ``tcp://host:port`` connects.
    endpoint: str = "tcp://*:5557"
    #: ROUTER socket for replay and snapshot requests; empty disables replay.
    replay_endpoint: str = "tcp://*:5558"
    #: ZMQ topic frame of every published batch.
    topic: str = "kv-events"
    #: Struct encoding of events: ``array`` (positional, what llm-d and the production-stack
    #: router decode) or ``map`` (field names, what current vLLM writes).
    encoding: EventEncoding = EventEncoding.ARRAY
    #: Block hashes as the 32-byte chunk key (``bytes``) or its first 8 bytes as an unsigned
    #: big-endian integer (``u64``, for consumers that only read integers).
    block_hash: str = Field("bytes", pattern=r"^(bytes|u64)$")
    #: Tokens per block announced in BlockStored (the namespace's chunk size).
    block_size: int = Field(256, ge=1)
    #: Published batches kept for replay.
    replay_batches: int = Field(10_000, ge=1)
    #: Events waiting to be batched; beyond it, events are dropped and the next batch is a
    #: full resync (AllBlocksCleared + BlockStored of everything present).
    queue_events: int = Field(100_000, ge=1)
    #: Longest time an event waits for its batch.
    batch_interval_ms: int = Field(50, ge=1, le=10_000)
    #: Most events in one batch.
    max_batch_events: int = Field(1024, ge=1)
    #: Data-parallel rank announced in every batch (vLLM's ``data_parallel_rank``).
    data_parallel_rank: int = Field(0, ge=0)


class Config(_Section):
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    dram: DramConfig = DramConfig()
    disk: DiskConfig = DiskConfig()
    hbm: HbmConfig = HbmConfig()
    chain: ChainConfig = ChainConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    remote: RemoteConfig = RemoteConfig()
    events: EventsConfig = EventsConfig()
    quotas: QuotaConfig = QuotaConfig()

    @model_validator(mode="after")
    def _check_inflight(self) -> "Config":
        need = self.server.max_chunk_bytes + self.server.max_message_bytes
        if self.quotas.daemon_max_inflight_request_bytes < need:
            raise ValueError("quotas.daemon_max_inflight_request_bytes must hold at least one largest chunk plus one "
                             f"message (server.max_chunk_bytes + server.max_message_bytes = {need})")
        return self

    @model_validator(mode="before")
    @classmethod
    def _remote_joins_chain(cls, data: Any) -> Any:
        """``remote.enabled = true`` alone puts the remote tier at the end of the chain (the
        slowest level), so a deployment need not repeat it in ``chain.tiers``; listing
        ``"remote"`` there places it explicitly (and is dropped while remote is disabled)."""
        if not isinstance(data, dict):
            return data
        remote = data.get("remote")
        enabled = remote.enabled if isinstance(remote, RemoteConfig) else (remote or {}).get("enabled")
        if enabled not in (True, "true", "True", 1):
            return data
        chain = data.get("chain")
        if isinstance(chain, ChainConfig):
            tiers = list(chain.tiers)
            if Medium.REMOTE not in tiers:
                data = {**data, "chain": chain.model_copy(update={"tiers": tiers + [Medium.REMOTE]})}
            return data
        chain = dict(chain or {})
        tiers = list(chain.get("tiers", ChainConfig.model_fields["tiers"].default))
        if not any(_is_remote(t) for t in tiers):
            chain["tiers"] = tiers + ["remote"]
            data = {**data, "chain": chain}
        return data


def _is_remote(t: Any) -> bool:
    return t == Medium.REMOTE or (isinstance(t, str) and t.strip().lower() == "remote")


ENV_PREFIX = "KVSTORE_"


def _set_path(tree: dict, dotted: str, value: Any, origin: str, sources: dict[str, str]) -> None:
    parts = [p for p in dotted.split(".") if p]
    if len(parts) < 2:
        raise InvalidArgument(f"setting {dotted!r} ({origin}) must be section.field, e.g. dram.capacity_bytes")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise InvalidArgument(f"setting {dotted!r} ({origin}): {p} is not a section")
    node[parts[-1]] = _coerce(value)
    sources[".".join(parts[:2])] = sources[parts[0]] = origin


def _coerce(value: Any) -> Any:
    """Values from env/flags are strings; TOML-parse them when they look like TOML literals
    (so a list is written ``["a:1", "b:2"]``, a string may be quoted or not)."""
    if not isinstance(value, str):
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


#: Extra advice for pydantic error types, keyed by type.
_HINTS = {
    "list_type": " (write a TOML list, e.g. --set 'server.listen=[\"127.0.0.1:50051\", \"unix:/run/kvstore.sock\"]')",
}


#: Settings that moved: old dotted key -> where it lives now (a config naming the old one
#: gets an error saying so).
MOVED_SETTINGS = {
    "server.stream_idle_timeout_s": "quotas.max_stream_idle_s",
    "server.max_inflight_bytes": "quotas.daemon_max_inflight_request_bytes",
    "server.max_pin_ttl_s": "quotas.max_pin_ttl_s",
    "server.max_pinned_bytes_per_tenant": "quotas.max_pinned_bytes",
    "server.max_open_leases_per_tenant": "quotas.max_open_leases",
    "server.max_open_reservations_per_tenant": "quotas.max_open_reservations",
    "remote.tenant_quota_bytes": "quotas.max_remote_bytes",
    "remote.tenant_quota_overrides": "auth.tokens.<token>.quotas.max_remote_bytes (per tenant)",
}


def _error_line(err: Mapping[str, Any], sources: Mapping[str, str], tree: Mapping[str, Any]) -> str:
    loc = [str(x) for x in err["loc"]]
    dotted = ".".join(loc)
    origin = sources.get(".".join(loc[:2])) or sources.get(loc[0]) if loc else None
    where = f" (from {origin})" if origin else ""
    if err["type"] == "extra_forbidden":
        if dotted in MOVED_SETTINGS:
            return f"{dotted}: this setting moved to {MOVED_SETTINGS[dotted]}{where}; rename it there"
        if len(loc) == 1:
            return f"{dotted}: unknown section{where}; sections are {', '.join(Config.model_fields)}"
        section = Config.model_fields.get(loc[0])
        known = ", ".join(section.annotation.model_fields) if section is not None and len(loc) == 2 else ""
        return f"{dotted}: unknown setting{where}" + (f"; [{loc[0]}] has {known}" if known else "")
    msg = err["msg"].removeprefix("Value error, ")
    if not dotted:      # a check across sections: the message names its settings
        return msg
    return f"{dotted}: {msg}{_HINTS.get(err['type'], '')}{where}"


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                overrides: list[str] | None = None) -> Config:
    """Builds the config from a TOML file, ``KVSTORE_*`` environment variables and ``k=v`` overrides.

    Raises InvalidArgument with every problem listed, each with the setting's dotted name and
    where the value came from (the file, the environment variable or the ``--set`` flag).
    Pure: reads the config file and nothing else (``preflight`` checks the outside world).
    """
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        p = Path(path)
        try:
            tree = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise InvalidArgument(f"config file {p} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"config file {p} cannot be read: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise InvalidArgument(f"config file {p} is not valid TOML: {e}") from None
        for section, body in tree.items():
            sources[section] = f"config file {p}"
            for fld in body if isinstance(body, dict) else ():
                sources[f"{section}.{fld}"] = f"config file {p}"
    env = os.environ if env is None else env
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            section, _, fld = name[len(ENV_PREFIX):].lower().partition("__")
            _set_path(tree, f"{section}.{fld}", value, f"environment variable {name}", sources)
    for item in overrides or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise InvalidArgument(f"override {item!r} must look like section.field=value")
        _set_path(tree, k.strip(), v.strip(), f"--set {item}", sources)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        lines = [_error_line(err, sources, tree) for err in e.errors()]
        raise InvalidArgument("invalid configuration: " + "; ".join(lines)) from None


# -- preflight: the outside world, checked before any side effect ----------------------------
def _bind_problem(addr: str) -> str | None:
    host, port = check_host_port(addr)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"cannot resolve {host!r}: {e.strerror}"
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} is already in use (another kvstore or service?)"
            return f"cannot bind {addr}: {e.strerror}"
    return None


def _writable_problem(path: Path, create_ok: bool) -> str | None:
    """Why ``path`` (a directory, possibly not there yet) cannot hold our files."""
    probe = path
    while not probe.exists():
        if not create_ok:
            return f"{path} does not exist"
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=probe):   # O_TMPFILE where supported: leaves nothing behind
            pass
    except OSError as e:
        return f"{probe} is not writable ({e.strerror})"
    return None


def preflight(config: Config) -> None:
    """Checks what validation of values alone cannot: listeners bindable, directories writable,
    the tokens file present and valid, room in /dev/shm for a named arena. Has no side effects
    (nothing is created), so it runs before the daemon creates anything. Raises InvalidArgument
    with every problem, each naming the setting to change, on one line."""
    problems: list[str] = []
    tcp = [a for a in config.server.listen if not a.startswith("unix:")]
    for a in tcp:
        if (why := _bind_problem(a)) is not None:
            problems.append(f"server.listen {a}: {why}")
    for a in config.server.listen:
        if a.startswith("unix:"):
            sock = Path(a[len("unix:"):])
            if (why := _writable_problem(sock.parent, create_ok=False)) is not None:
                problems.append(f"server.listen {a}: {why}")
    m = config.metrics.listen
    if m:
        if check_host_port(m)[1] in {check_host_port(a)[1] for a in tcp}:
            problems.append(f"metrics.listen {m}: same port as server.listen")
        elif (why := _bind_problem(m)) is not None:
            problems.append(f"metrics.listen {m}: {why}; pick another port or metrics.listen=\"\" to disable")
    if (why := _writable_problem(Path(config.disk.path).absolute(), create_ok=True)) is not None:
        problems.append(f"disk.path {config.disk.path}: {why}")
    if config.auth.tokens_file is not None:
        try:
            config.auth.load_tokens()
        except FileNotFoundError:
            problems.append(f"auth.tokens_file {config.auth.tokens_file} does not exist")
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"auth.tokens_file {config.auth.tokens_file} cannot be read: {e}")
        except tomllib.TOMLDecodeError as e:
            problems.append(f"auth.tokens_file {config.auth.tokens_file} is not valid TOML: {e}")
        except (InvalidArgument, ValidationError) as e:
            problems.append(f"auth.tokens_file {config.auth.tokens_file}: {_one_line(e)}")
    else:
        try:
            config.auth.load_tokens()
        except InvalidArgument as e:
            problems.append(f"auth.tokens: {e}")
    name = config.dram.shm_name
    if name and name != "auto":
        shm = Path("/dev/shm")
        if not shm.is_dir():
            problems.append(f"dram.shm_name {name!r}: {shm} does not exist; set dram.shm_name = \"\"")
        else:
            st = os.statvfs(shm)
            old = shm / name
            free = st.f_bavail * st.f_frsize + (old.stat().st_size if old.is_file() else 0)
            if free < config.dram.capacity_bytes:
                problems.append(f"dram.capacity_bytes {config.dram.capacity_bytes}: /dev/shm has only {free} bytes "
                                "free; lower it, enlarge /dev/shm (docker --shm-size) or set dram.shm_name = \"\"")
    if problems:
        raise InvalidArgument("; ".join(problems))


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
