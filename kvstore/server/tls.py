"""Server-side TLS: credentials for TCP listeners from ``server.tls`` (``TlsConfig``).

Mutual TLS: with ``client_ca_file`` and ``require_client_cert``, the handshake fails for a
client without a certificate signed by that CA, and a verified certificate's identity (subject
CN, SAN DNS/URI) maps to a tenant through ``auth.certs``. grpcio has no "request a client
certificate but verify it only when sent" mode (its optional mode does not verify), so
certificate identities are trusted only with ``require_client_cert = true``.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from ..config import Config, TlsConfig
from ..domain.errors import InvalidArgument


def _read(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InvalidArgument(f"server.tls.{what} {path}: cannot read it ({e.strerror or e})") from None
    if b"-----BEGIN" not in data:
        raise InvalidArgument(f"server.tls.{what} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


def verifies_client_certs(tls: TlsConfig) -> bool:
    """True when TLS listeners verify client certificates (so their identities can be trusted)."""
    return tls.enabled and tls.client_ca_file is not None and tls.require_client_cert


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Credentials for ``add_secure_port``; InvalidArgument naming the setting for unreadable files."""
    assert tls.enabled and tls.key_file is not None
    pair = (_read(tls.key_file, "key_file"), _read(tls.cert_file, "cert_file"))
    require = verifies_client_certs(tls)
    root = _read(tls.client_ca_file, "client_ca_file") if require else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=require)


def check_tls_config(config: Config) -> None:
    """Cross-section checks: certificate identities need verified client certificates."""
    if config.auth.certs and not verifies_client_certs(config.server.tls):
        raise InvalidArgument("auth.certs maps client-certificate identities, which needs mutual TLS: set "
                              "server.tls.cert_file, key_file, client_ca_file and require_client_cert = true")
    if config.server.tls.client_ca_file is not None and not config.server.tls.require_client_cert:
        raise InvalidArgument("server.tls.client_ca_file without require_client_cert = true would not verify "
                              "client certificates (grpcio has no verified-optional mode); set "
                              "require_client_cert = true, or remove client_ca_file for TLS with bearer tokens")


def is_unix(addr: str) -> bool:
    return addr.startswith("unix:")
