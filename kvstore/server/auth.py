"""Who is calling: bearer-token authentication, with the tenant taken from the credential.

``Authenticator.authenticate(metadata)`` turns the ``authorization: Bearer <token>`` metadata
into a ``Principal``; the request interceptor (``status.py``) calls it once per RPC and
stores the principal in a context variable the servicers read with ``current_principal()``.
With auth off every caller is ``Principal("", admin=True, authenticated=False)``.
"""

from __future__ import annotations

import contextvars
import hmac
from dataclasses import dataclass
from typing import Iterable

from ..config import AuthConfig, TokenEntry
from ..domain.errors import PermissionDenied, Unauthenticated


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    admin: bool
    #: False when auth is off: the caller may then use namespaces of every tenant.
    authenticated: bool
    #: May map the shared arena and presence index (which hold every tenant's chunks).
    local_path: bool = False

    @property
    def tenant_scope(self) -> str | None:
        """The tenant whose namespaces this caller may touch; None = every tenant."""
        return self.tenant if self.authenticated else None

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


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self.enabled = config.enabled
        tokens: dict[str, TokenEntry] = config.load_tokens() if self.enabled else {}
        self._tokens = {t.encode(): Principal(e.tenant, e.admin, True, e.local_path) for t, e in tokens.items()}

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        header = None
        for k, v in metadata or ():
            if k == "authorization":
                header = v.decode() if isinstance(v, bytes) else v
                break
        if header is None:
            raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <token>' "
                                  "(client: token=..., kvctl: --token or KVSTORE_TOKEN)")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("malformed authorization metadata: expected 'Bearer <token>'")
        tok = token.strip().encode()
        for known, principal in self._tokens.items():  # constant-time compare per token
            if hmac.compare_digest(known, tok):
                return principal
        raise Unauthenticated("invalid token: it is not in the daemon's auth.tokens / auth.tokens_file")
