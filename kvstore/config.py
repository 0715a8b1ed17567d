"""Typed, validated configuration: one object per concern, unknown keys rejected.

Sources, later ones winning: defaults < TOML file (``--config``) < environment
(``KVSTORE_<SECTION>__<FIELD>``, e.g. ``KVSTORE_DRAM__CAPACITY_BYTES=8GiB``) < command-line
overrides (``--set dram.capacity_bytes=8GiB``). Byte sizes accept integers or strings with a
binary/decimal unit (``512MiB``, ``2GB``); durations are seconds.
"""

from __future__ import annotations

import enum
import os
import re
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

    # -- admission control and per-tenant limits (docs/security.md, "Admission control") ----------
    #: Daemon-wide budget of request bytes received but not yet stored (Put data held in
    #: memory). A stream over budget waits up to ``inflight_wait_s``, then RESOURCE_EXHAUSTED.
    max_inflight_bytes: Bytes = 1024**3
    #: Seconds a Put stream waits for in-flight budget before it is refused.
    inflight_wait_s: float = Field(5.0, ge=0, le=600)
    #: Seconds a Put or Get stream may make no progress (no message received, or none taken
    #: by the client) before it is cancelled with DEADLINE_EXCEEDED.
    stream_idle_timeout_s: float = Field(30.0, gt=0, le=3600)
    #: Most Put and Get streams open at once, daemon-wide; more are refused at once.
    max_concurrent_streams: int = Field(64, ge=1)
    #: Longest pin a Lookup(pin_ttl_s=...) may ask for; longer requests are clamped to it.
    max_pin_ttl_s: float = Field(60.0, gt=0, le=86400)
    #: Bytes one tenant may hold pinned through Lookup (counted at the namespace's raw chunk size).
    max_pinned_bytes_per_tenant: Bytes = 256 * 1024**2
    #: Same-host read leases (LeaseRead answers with a lease id) one tenant may hold open.
    max_open_leases_per_tenant: int = Field(1024, ge=1)
    #: Same-host chunk reservations (reserved, uncommitted slots) one tenant may hold open.
    max_open_reservations_per_tenant: int = Field(4096, ge=1)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("listen needs at least one address")
        for a in v:
            if not (a.startswith("unix:") or re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\s]+):[0-9]{1,5}", a)):
                raise ValueError(f"{a!r} is not host:port or unix:/path")
        return v

    @model_validator(mode="after")
    def _check_piece(self) -> "ServerConfig":
        if self.stream_piece_bytes + 4096 > self.max_message_bytes:
            raise ValueError("stream_piece_bytes must be at least 4 KiB below max_message_bytes")
        if self.max_inflight_bytes < self.max_chunk_bytes + self.max_message_bytes:
            raise ValueError("max_inflight_bytes must hold at least one largest chunk plus one message "
                             "(max_chunk_bytes + max_message_bytes)")
        return self


class TokenEntry(_Section):
    tenant: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    #: May call the Admin service.
    admin: bool = False
    #: May use the same-host shared-memory path. The arena and presence index hold every
    #: tenant's chunks, so grant this only to the co-located engine trusted with all of them;
    #: other tokens use the stream path, where the tenant check applies to every request.
    local_path: bool = False


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
    allow_insecure_remote: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.tokens) or self.tokens_file is not None

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
    policy: EvictionPolicy = EvictionPolicy.S3FIFO
    #: How chunks are held in DRAM. RAW keeps the same-host path a plain copy; a codec holds
    #: more chunks in the same arena, decoded by the reader.
    codec: TierCodec = TierCodec.RAW
    #: Allocation granule of the arena; chunks occupy whole pages.
    page_bytes: Bytes = 64 * 1024
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
    enabled: bool = True
    #: Directory holding chunk files and the LMDB index. Created if missing.
    path: Path = Path("./kvstore-data")
    capacity_bytes: Bytes = 16 * 1024**3
    policy: EvictionPolicy = EvictionPolicy.LRU
    #: How chunks are written to disk (encoded by the writer thread, off the request path).
    codec: TierCodec = TierCodec.RAW
    #: Chunks waiting to be written; when full, MEMORY-durability writes to disk are dropped
    #: (and counted) rather than blocking the request path.
    write_queue_chunks: int = Field(256, ge=1)
    #: fsync chunk files and the index before a PERSISTED put is acknowledged.
    fsync: bool = True
    #: Largest LMDB index (metadata only; chunk bytes live in files).
    index_map_bytes: Bytes = 1024**3


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


class LogConfig(_Section):
    level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    #: One JSON object per log line instead of text.
    json_lines: bool = False


class Config(_Section):
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    dram: DramConfig = DramConfig()
    disk: DiskConfig = DiskConfig()
    chain: ChainConfig = ChainConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()


ENV_PREFIX = "KVSTORE_"


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = [p for p in dotted.split(".") if p]
    if len(parts) < 2:
        raise InvalidArgument(f"setting {dotted!r} must be section.field, e.g. dram.capacity_bytes")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise InvalidArgument(f"setting {dotted!r}: {p} is not a section")
    node[parts[-1]] = _coerce(value)


def _coerce(value: Any) -> Any:
    """Values from env/flags are strings; TOML-parse them when they look like TOML literals."""
    if not isinstance(value, str):
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                overrides: list[str] | None = None) -> Config:
    """Builds the config from a TOML file, ``KVSTORE_*`` environment variables and ``k=v`` overrides.

    Raises InvalidArgument with every problem listed, each with the setting's dotted name.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            tree = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise InvalidArgument(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise InvalidArgument(f"config file {p} is not valid TOML: {e}") from None
    env = os.environ if env is None else env
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            section, _, fld = name[len(ENV_PREFIX):].lower().partition("__")
            _set_path(tree, f"{section}.{fld}", value)
    for item in overrides or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise InvalidArgument(f"override {item!r} must look like section.field=value")
        _set_path(tree, k.strip(), v.strip())
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"{loc}: {err['msg']}")
        raise InvalidArgument("invalid configuration:\n  " + "\n  ".join(lines)) from None
