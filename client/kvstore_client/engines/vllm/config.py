"""The connector's settings, read from vLLM's ``kv_transfer_config.kv_connector_extra_config``.

Every key is optional; unknown keys are refused (a typo must not silently fall back to a
default). Keys, with their defaults::

    {"kvstore.addr": "127.0.0.1:50051",    sidecar address (host:port or unix:/path)
     "kvstore.token": null,                bearer token (or env KVSTORE_TOKEN)
     "kvstore.tls": false,                 TLS to the sidecar: false; true (system roots); or
                                           {"ca_file": PEM roots, "cert_file" + "key_file": this
                                           engine's certificate for mutual TLS, "server_name": the
                                           name on the daemon's certificate when it differs}
     "kvstore.chunk_tokens": null,         chunk size, a multiple of vLLM's block size (default:
                                           the smallest multiple >= 128 tokens: 128 on the CPU backend)
     "kvstore.model_id": null,             model identity override (default: derived, see namespace.py)
     "kvstore.durability": "memory",       "memory" | "persisted" (acknowledged once on disk)
     "kvstore.codec": null,                the tier codec the sidecar applies; informational, must
                                           match the daemon (the client reads whatever it stores)
     "kvstore.reconnect_s": 5.0,           a sidecar that could not be reached is retried after this
     "kvstore.timeout_s": 30.0,            per-RPC deadline
     "kvstore.save": true,                 store new chunks (false: load only)
     "kvstore.partial_chunks": true,       also store and load a prompt's trailing partial chunk, so
                                           a prompt seen before (up to its last token) loads all
                                           but its last token instead of recomputing up to a chunk
     "kvstore.fault_injection": false}     honour per-request fault requests (tests only)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from kvstore_wire.channel import TlsOptions, is_local_address
from kvstore_wire.types import Durability

PREFIX = "kvstore."
#: Default chunk: at least this many tokens, rounded up to whole vLLM blocks (one block of the
#: CPU backend, 8 of a 16-token GPU block). vLLM loads whole blocks only, so a chunk of one
#: block recomputes no more of a hit prompt than vLLM itself must; the per-chunk overheads
#: (one key, one extent, one CRC) stay far below the copy of a chunk this size.
DEFAULT_CHUNK_MIN_TOKENS = 128
#: After a failed connect, how long requests are treated as misses before trying again.
DEFAULT_RECONNECT_S = 5.0
DEFAULT_TIMEOUT_S = 30.0
_DURABILITY = {"memory": Durability.MEMORY, "persisted": Durability.PERSISTED}
_TLS_KEYS = ("ca_file", "cert_file", "key_file", "server_name")


def _tls(value: Any) -> TlsOptions | None:
    """``kvstore.tls`` as ``TlsOptions`` (None: plaintext); ValueError says what to fix."""
    if value is None or value is False:
        return None
    if value is True:
        return TlsOptions()
    if not isinstance(value, Mapping):
        raise ValueError(f"kvstore.tls must be false, true or an object with {list(_TLS_KEYS)}, got {value!r}")
    unknown = sorted(set(value) - set(_TLS_KEYS))
    if unknown:
        raise ValueError(f"kvstore.tls: unknown keys {unknown}; accepted: {list(_TLS_KEYS)}")
    for name in ("ca_file", "cert_file", "key_file"):
        path = value.get(name)
        if path is not None and not os.path.isfile(str(path)):
            raise ValueError(f"kvstore.tls.{name}: {path!r} is not a readable file")
    try:
        return TlsOptions(**{k: value.get(k) for k in _TLS_KEYS})
    except ValueError as e:
        raise ValueError(f"kvstore.tls: {e}") from None


@dataclass(frozen=True)
class ConnectorConfig:
    """Typed form of the ``kvstore.*`` keys (see the module docstring)."""

    addr: str = "127.0.0.1:50051"
    token: str | None = None
    tls: TlsOptions | None = None       #: None: plaintext (a unix socket or loopback)
    chunk_tokens: int | None = None     #: None: see ``DEFAULT_CHUNK_MIN_TOKENS`` (``for_block_size``)
    model_id: str | None = None
    durability: Durability = Durability.MEMORY
    codec: str | None = None
    reconnect_s: float = DEFAULT_RECONNECT_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    save: bool = True
    partial_chunks: bool = True
    fault_injection: bool = False

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> "ConnectorConfig":
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        unknown = []
        for key, value in extra.items():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else None
            if name not in known:
                unknown.append(key)
                continue
            values[name] = value
        if unknown:
            raise ValueError(f"kv_connector_extra_config: unknown keys {sorted(unknown)}; the kvstore connector "
                             f"accepts {sorted(PREFIX + k for k in known)}")
        if "durability" in values:
            d = str(values["durability"]).lower()
            if d not in _DURABILITY:
                raise ValueError(f"kvstore.durability must be one of {sorted(_DURABILITY)}, got {values['durability']!r}")
            values["durability"] = _DURABILITY[d]
        if "tls" in values:
            values["tls"] = _tls(values["tls"])
        if values.get("token") is None and os.environ.get("KVSTORE_TOKEN"):
            values["token"] = os.environ["KVSTORE_TOKEN"]
        cfg = cls(**values)
        cfg._check()
        return cfg

    def _check(self) -> None:
        if self.chunk_tokens is not None and (not isinstance(self.chunk_tokens, int) or self.chunk_tokens <= 0):
            raise ValueError(f"kvstore.chunk_tokens must be a positive integer, got {self.chunk_tokens!r}")
        if self.token and self.tls is None and not is_local_address(self.addr):
            raise ValueError(f"kvstore.token would travel to {self.addr} in plaintext: set kvstore.tls (e.g. "
                             '{"ca_file": "/path/ca.pem"}) or use a unix socket or loopback address')
        for name in ("reconnect_s", "timeout_s"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"kvstore.{name} must be > 0 seconds")

    def for_block_size(self, block_size: int) -> "ConnectorConfig":
        """This config with ``chunk_tokens`` resolved for vLLM's block size (checked: whole blocks)."""
        if self.chunk_tokens is None:
            return replace(self, chunk_tokens=-(-DEFAULT_CHUNK_MIN_TOKENS // block_size) * block_size)
        self.check_block_size(block_size)
        return self

    def check_block_size(self, block_size: int) -> None:
        if self.chunk_tokens % block_size:
            raise ValueError(f"kvstore.chunk_tokens={self.chunk_tokens} must be a multiple of vLLM's block size "
                             f"{block_size} (chunks are loaded and saved as whole blocks)")
