"""Client channels to a kvstore daemon: TLS credentials, options and the bearer-token rule.

Shared by the client library and kvctl so both take the same options::

    tls = TlsOptions(ca_file="ca.pem", cert_file="me.pem", key_file="me.key")
    ch = open_channel("kvstore.internal:50051", tls=tls)
    md = auth_metadata(token, "kvstore.internal:50051", tls)   # () without a token

The bearer token is a replayable secret: ``auth_metadata`` refuses to attach it to a plaintext
channel to another host (the daemon refuses such a token as well), so it travels only over TLS,
a unix socket or loopback.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc


class InsecureTransportError(ValueError):
    """A bearer token would travel in the clear to another host."""


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS for a channel. ``ca_file``: PEM roots that sign the daemon's certificate (default:
    the system roots); ``cert_file``/``key_file``: this client's certificate for mutual TLS;
    ``server_name``: the name to check the daemon's certificate against when it differs from
    the address's host (e.g. connecting by IP)."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS client certificate: give both cert_file and key_file (or neither)")


def is_local_address(addr: str) -> bool:
    """True for ``unix:`` addresses and loopback hosts (where a plaintext token cannot be sniffed
    off the network)."""
    if addr.startswith("unix:"):
        return True
    host = addr.rpartition(":")[0].strip("[]") if ":" in addr else addr
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"TLS {what} {path}: cannot read it ({e.strerror or e})") from None


def channel_credentials(tls: TlsOptions) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=_read(tls.ca_file, "CA file"),
                                        private_key=_read(tls.key_file, "key file"),
                                        certificate_chain=_read(tls.cert_file, "certificate file"))


def channel_options(tls: TlsOptions | None, base: Sequence[tuple[str, object]] = ()) -> list[tuple[str, object]]:
    opts = list(base)
    if tls is not None and tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return opts


def open_channel(addr: str, *, tls: TlsOptions | None = None, options: Sequence[tuple[str, object]] = (),
                 aio: bool = False):
    """A sync (or ``aio``) channel to ``addr``: TLS when ``tls`` is given, else plaintext.
    TLS does not apply to ``unix:`` addresses (the daemon serves them in plaintext)."""
    mod = grpc.aio if aio else grpc
    opts = channel_options(tls, options)
    if tls is not None and not addr.startswith("unix:"):
        return mod.secure_channel(addr, channel_credentials(tls), options=opts)
    return mod.insecure_channel(addr, options=opts)


def auth_metadata(token: str | None, addr: str, tls: TlsOptions | None) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying ``token``; InsecureTransportError for plaintext to another host."""
    if not token:
        return ()
    if tls is None and not is_local_address(addr):
        raise InsecureTransportError(
            f"refusing to send the bearer token to {addr} in plaintext: enable TLS (client tls=TlsOptions(...), "
            "kvctl --tls-ca) or connect over a unix socket / loopback")
    return (("authorization", f"Bearer {token}"),)
