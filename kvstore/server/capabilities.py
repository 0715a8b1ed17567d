"""Which right each RPC needs: one table, checked by the interceptor before any handler runs.

Rights:
- ``STREAM``: the data plane over gRPC streams (KVStore service). Every authenticated caller.
- ``LOCAL_PATH``: the same-host path (LocalData service). The shared arena and presence index
  hold every tenant's chunks, so only a fully trusted co-located engine gets it.
- ``ADMIN``: the Admin service (kvctl).

Fail closed: a method under ``/kvstore.v1.`` that is not in ``METHOD_RIGHTS`` (a new RPC
whose author forgot this table) is denied for everyone but the auth-off anonymous caller.
Health checking and reflection are outside the kvstore package and not checked.
"""

from __future__ import annotations

import enum

from ..domain.errors import PermissionDenied

KVSTORE_PREFIX = "/kvstore.v1."


class Right(str, enum.Enum):
    STREAM = "stream"
    LOCAL_PATH = "local_path"
    ADMIN = "admin"


_DATA = ("RegisterNamespace", "Put", "Lookup", "Exists", "Get", "Delete")
_LOCAL = ("Attach", "LeaseRead", "ReserveWrite", "CommitWrite", "Release")
_ADMIN = ("GetStats", "ListNamespaces", "ListKeys", "Inspect", "Evict", "Pin", "Unpin", "Clear", "Verify")

#: Full gRPC method name -> the right it needs.
METHOD_RIGHTS: dict[str, Right] = {
    **{f"/kvstore.v1.KVStore/{m}": Right.STREAM for m in _DATA},
    **{f"/kvstore.v1.LocalData/{m}": Right.LOCAL_PATH for m in _LOCAL},
    **{f"/kvstore.v1.Admin/{m}": Right.ADMIN for m in _ADMIN},
}

_HOW_TO_GRANT = {
    Right.STREAM: "this credential may not use the data plane",
    Right.LOCAL_PATH: ("the same-host path shares one arena with every tenant, so it needs a token or "
                       "certificate configured with local_path = true (only for a fully trusted co-located "
                       "engine); other callers use the KVStore stream path"),
    Right.ADMIN: "Admin RPCs (kvctl) need a token or certificate configured with admin = true",
}


def is_kvstore_method(method: str) -> bool:
    return method.startswith(KVSTORE_PREFIX)


def required_right(method: str) -> Right | None:
    """The right ``method`` needs; None for a kvstore method missing from the table (deny)."""
    return METHOD_RIGHTS.get(method)


def check(method: str, rights: frozenset[Right], unrestricted: bool = False) -> None:
    """Raises PermissionDenied unless a caller holding ``rights`` may call ``method``.

    ``unrestricted``: the auth-off anonymous caller, who may call every method that exists.
    """
    need = required_right(method)
    if need is None:
        if unrestricted:
            return
        raise PermissionDenied(f"{method} is not in the daemon's capability table; it is denied")
    if need not in rights:
        raise PermissionDenied(f"{method.rsplit('/', 1)[-1]} needs the '{need.value}' right: {_HOW_TO_GRANT[need]}")
