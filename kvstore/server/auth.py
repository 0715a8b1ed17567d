"""Who is calling: bearer tokens or verified client certificates, with the tenant taken from the credential.

``Authenticator.authenticate(metadata, peer)`` turns the ``authorization: Bearer <token>``
metadata, or the identity of a verified client certificate (``auth.certs``), into a
``Principal``. The request interceptor (``status.py``) calls it once per RPC, checks the
method's right (``capabilities.py``) and stores the principal in a context variable the
servicers read with ``current_principal()``. With auth off every caller is ``ANONYMOUS``
(tenant ``""``, every right).

Transport rule: a bearer token is a replayable secret, so it is accepted only over TLS, a unix
socket or loopback TCP. A token that arrived on plaintext non-loopback TCP is refused (and is
then known to the network: rotate it). A token, when present, takes precedence over a client
certificate.
"""

from __future__ import annotations

import contextvars
import enum
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Iterable, Mapping

from ..config import AuthConfig, CertEntry, TokenEntry
from ..domain.errors import PermissionDenied, Unauthenticated
from .capabilities import Right


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    admin: bool
    #: False when auth is off: the caller may then use namespaces of every tenant.
    authenticated: bool
    #: May map the shared arena and presence index (which hold every tenant's chunks).
    local_path: bool = False
    #: Same-host commits take this caller's CRC32Cs without a re-read (config ``trust_client_crc``).
    trust_client_crc: bool = False

    @property
    def tenant_scope(self) -> str | None:
        """The tenant whose namespaces this caller may touch; None = every tenant."""
        return self.tenant if self.authenticated else None

    @property
    def rights(self) -> frozenset[Right]:
        r = {Right.STREAM}
        if self.admin:
            r.add(Right.ADMIN)
        if self.local_path:
            r.add(Right.LOCAL_PATH)
        return frozenset(r)

    def require_admin(self) -> None:
        if not self.admin:
            raise PermissionDenied("this token is not an admin token; Admin RPCs (kvctl) need a token "
                                   "configured with admin = true")


ANONYMOUS = Principal("", admin=True, authenticated=False, local_path=True)
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("kvstore_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    return _current.get()


def set_principal(p: Principal) -> contextvars.Token:
    return _current.set(p)


class Transport(enum.Enum):
    TLS = "tls"
    UNIX = "unix"
    LOOPBACK = "loopback"
    PLAINTEXT_REMOTE = "plaintext"


#: auth-context properties (grpc core names) that carry a verified peer certificate's identity.
_IDENTITY_PROPERTIES = ("x509_common_name", "x509_subject_alternative_name", "peer_dns", "peer_uri")


@dataclass(frozen=True, slots=True)
class Peer:
    """The transport a call came over and, for mutual TLS, the client certificate's identities."""

    transport: Transport
    cert_identities: tuple[str, ...] = ()

    @classmethod
    def from_grpc(cls, peer: str, auth_context: Mapping[str, Iterable[bytes]] | None) -> "Peer":
        """From ``context.peer()`` (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, ``unix:/p``) and
        ``context.auth_context()``."""
        ctx = auth_context or {}
        if [bytes(v) for v in ctx.get("transport_security_type", ())] == [b"ssl"]:
            ids: list[str] = []
            for prop in _IDENTITY_PROPERTIES:
                for v in ctx.get(prop, ()):
                    s = bytes(v).decode("utf-8", "replace")
                    if s and s not in ids:
                        ids.append(s)
            return cls(Transport.TLS, tuple(ids))
        if peer.startswith("unix"):
            return cls(Transport.UNIX)
        host = peer.partition(":")[2].rpartition(":")[0].strip("[]")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        return cls(Transport.LOOPBACK if loopback else Transport.PLAINTEXT_REMOTE)


#: The peer of in-process callers and of tests that do not say: trusted transport.
LOCAL_PEER = Peer(Transport.LOOPBACK)


def _principal(e: TokenEntry | CertEntry) -> Principal:
    return Principal(e.tenant, e.admin, True, e.local_path, e.trust_client_crc)


class Authenticator:
    """Maps credentials to principals. ``trust_cert_identities``: the TLS listener verifies
    client certificates against ``server.tls.client_ca_file`` (only then is a certificate's
    identity proof of anything)."""

    def __init__(self, config: AuthConfig, trust_cert_identities: bool = False) -> None:
        self.enabled = config.enabled
        tokens: dict[str, TokenEntry] = config.load_tokens() if self.enabled else {}
        self._tokens = {t.encode(): _principal(e) for t, e in tokens.items()}
        self._certs = {ident: _principal(e) for ident, e in config.certs.items()} if trust_cert_identities else {}

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None, peer: Peer = LOCAL_PEER) -> Principal:
        """The caller's principal; Unauthenticated (with what to do) when there is none."""
        if not self.enabled:
            return ANONYMOUS
        header = None
        for k, v in metadata or ():
            if k == "authorization":
                header = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                break
        if header is None:
            for ident in peer.cert_identities:
                p = self._certs.get(ident)
                if p is not None:
                    return p
            if peer.cert_identities:
                raise Unauthenticated(f"client certificate identities {list(peer.cert_identities)[:4]} are not in "
                                      "the daemon's auth.certs; add one of them there or send a bearer token")
            raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <token>' "
                                  "(client: token=..., kvctl: --token or KVSTORE_TOKEN) or a client certificate")
        if peer.transport is Transport.PLAINTEXT_REMOTE:
            raise Unauthenticated("bearer tokens are accepted only over TLS, a unix socket or loopback; this call "
                                  "came over plaintext TCP from another host: enable TLS (server.tls.cert_file / "
                                  "key_file, client --tls-ca) and rotate the token, which the network has seen")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("malformed authorization metadata: expected 'Bearer <token>'")
        tok = token.strip().encode()
        for known, principal in self._tokens.items():  # constant-time compare per token
            if hmac.compare_digest(known, tok):
                return principal
        raise Unauthenticated("invalid token: it is not in the daemon's auth.tokens / auth.tokens_file")
