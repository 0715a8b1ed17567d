"""``kvctl``: the operator's CLI for a running kvstore daemon.

    kvctl [--addr ADDR] [--token T] [--json] COMMAND ...

Commands: status, stats, namespaces, ls, inspect, evict, pin, unpin, clear. Namespace ids
and keys are hex. Human tables by default, ``--json`` for scripts. Exit codes: 0 ok,
1 the daemon refused the request (message printed), 2 the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import grpc
from google.protobuf.json_format import MessageToDict

from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc
from kvstore_wire.types import Tier

DEFAULT_ADDR = "127.0.0.1:50051"
EXIT_REFUSED = 1
EXIT_UNREACHABLE = 2
_TIERS = {"dram": Tier.DRAM, "disk": Tier.DISK, "hbm": Tier.HBM, "remote": Tier.REMOTE}


def _hex(s: str, what: str) -> bytes:
    try:
        b = bytes.fromhex(s)
    except ValueError:
        raise SystemExit(f"kvctl: {what} must be hex, got {s!r}") from None
    if len(b) != 32:
        raise SystemExit(f"kvctl: {what} must be 32 bytes (64 hex digits), got {len(b)} bytes")
    return b


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[list], headers: list[str]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _tier_name(t: int) -> str:
    return Tier(t).name.lower() if t in set(Tier) else str(t)


def _dtype_name(d: int) -> str:
    from kvstore_wire.types import DType
    return DType(d).name.lower() if d in set(DType) else str(d)


def _dict(msg) -> dict:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _channel(args) -> tuple[grpc.Channel, tuple]:
    """The channel to the daemon and the call metadata (the token), from the --tls-* and --token options."""
    from kvstore_wire.channel import InsecureTransportError, TlsOptions, auth_metadata, open_channel

    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name:
        try:
            tls = TlsOptions(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key,
                             server_name=args.tls_server_name)
        except ValueError as e:
            raise SystemExit(f"kvctl: {e}") from None
    try:
        md = auth_metadata(args.token or os.environ.get("KVSTORE_TOKEN"), args.addr, tls)
        return open_channel(args.addr, tls=tls), md
    except (InsecureTransportError, ValueError) as e:
        raise SystemExit(f"kvctl: {e}") from None


class Ctl:
    def __init__(self, args) -> None:
        self.args = args
        self.channel, self.md = _channel(args)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    def call(self, method: str, request):
        return getattr(self.admin, method)(request, metadata=self.md, timeout=self.args.timeout)

    def out(self, obj, human: str) -> None:
        print(json.dumps(obj, indent=2, sort_keys=True) if self.args.json else human)

    # ------------------------------------------------------------------ commands
    def status(self) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        h = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                          timeout=self.args.timeout)
        serving = health_pb2.HealthCheckResponse.ServingStatus.Name(h.status)
        st = self.call("GetStats", admin_pb2.GetStatsRequest())
        obj = {"addr": self.args.addr, "health": serving, "version": st.version, "uptime_s": st.uptime_s,
               "namespaces": st.namespaces,
               "chunks": {_tier_name(t.tier): t.chunks for t in st.tiers},
               "used_bytes": {_tier_name(t.tier): t.used_bytes for t in st.tiers}}
        tiers = ", ".join(f"{_tier_name(t.tier)} {t.chunks} chunks / {_size(t.used_bytes)} of "
                          f"{_size(t.capacity_bytes)}" for t in st.tiers)
        self.out(obj, f"kvstore {st.version} at {self.args.addr}: {serving}, up {st.uptime_s:.0f}s, "
                      f"{st.namespaces} namespaces\n  {tiers}")

    def stats(self) -> None:
        st = self.call("GetStats", admin_pb2.GetStatsRequest())
        rows = []
        for t in st.tiers:
            reads = t.hits + t.misses
            rows.append([_tier_name(t.tier), t.policy, _size(t.capacity_bytes), _size(t.used_bytes), t.chunks,
                         t.pinned_chunks, t.hits, t.misses, f"{100 * t.hits / reads:.1f}%" if reads else "-",
                         t.evictions, t.corrupt])
        human = _table(rows, ["tier", "policy", "capacity", "used", "chunks", "pinned", "hits", "misses", "hit rate",
                              "evictions", "corrupt"])
        human += f"\nwrite queue: {st.write_queue_depth} waiting, {st.write_queue_dropped} dropped"
        self.out(_dict(st), human)

    def namespaces(self) -> None:
        r = self.call("ListNamespaces", admin_pb2.ListNamespacesRequest())
        rows = [[n.namespace_id.hex()[:16], n.tenant or "-", n.spec.model, _dtype_name(n.spec.dtype), n.spec.num_layers,
                 n.spec.num_kv_heads, n.spec.head_dim, n.spec.chunk_tokens, f"{n.spec.tp_rank}/{n.spec.tp_size}",
                 _size(n.chunk_bytes)] for n in r.namespaces]
        obj = [{**_dict(n), "namespace_id": n.namespace_id.hex()} for n in r.namespaces]
        self.out(obj, _table(rows, ["namespace", "tenant", "model", "dtype", "layers", "kv_heads", "head_dim",
                                    "chunk_tokens", "tp", "chunk size"]))

    @staticmethod
    def _entry(e) -> dict:
        d = _dict(e)
        d["namespace_id"], d["key"] = e.namespace_id.hex(), e.key.hex()
        d["tiers"] = [_tier_name(t) for t in e.tiers]
        d["payload_bytes"] = e.payload_bytes
        d["hits"] = e.hits
        return d

    def ls(self) -> None:
        a = self.args
        req = admin_pb2.ListKeysRequest(namespace_id=_hex(a.namespace, "namespace") if a.namespace else b"",
                                        tier=_TIERS[a.tier] if a.tier else 0, limit=a.limit)
        entries = []
        while True:
            r = self.call("ListKeys", req)
            entries.extend(r.entries)
            if not r.next_page_token or not a.all:
                break
            req.page_token = r.next_page_token
        rows = [[e.namespace_id.hex()[:16], e.key.hex(), ",".join(_tier_name(t) for t in e.tiers), e.num_tokens,
                 _size(e.payload_bytes), "yes" if e.pinned else "", e.hits] for e in entries]
        human = _table(rows, ["namespace", "key", "tiers", "tokens", "size", "pinned", "hits"])
        if r.next_page_token and not a.all:
            human += "\n(more keys: use --all or a larger --limit)"
        self.out([self._entry(e) for e in entries], human)

    def inspect(self) -> None:
        r = self.call("Inspect", admin_pb2.InspectRequest(namespace_id=_hex(self.args.namespace, "namespace"),
                                                          key=_hex(self.args.key, "key")))
        e = self._entry(r.entry)
        ns = r.namespace
        e["namespace"] = {**_dict(ns), "namespace_id": ns.namespace_id.hex()}
        when = lambda s: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s)) if s else "-"  # noqa: E731
        human = "\n".join([
            f"key          {e['key']}", f"namespace    {ns.namespace_id.hex()} ({ns.spec.model}, tenant "
                                          f"{ns.tenant or '-'})",
            f"tiers        {', '.join(e['tiers'])}", f"tokens       {r.entry.num_tokens}",
            f"size         {_size(r.entry.payload_bytes)} ({r.entry.payload_bytes} bytes)",
            f"encoding     {e.get('encoding')}", f"key kind     {e.get('key_kind')}",
            f"pinned       {'yes' if r.entry.pinned else 'no'}"
            + (f" until {when(r.entry.pin_expires_unix_s)}" if r.entry.pin_expires_unix_s else ""),
            f"created      {when(r.entry.created_unix_s)}", f"last access  {when(r.entry.last_access_unix_s)}",
            f"hits         {r.entry.hits}"])
        self.out(e, human)

    def evict(self) -> None:
        a = self.args
        keys = [_hex(k, "key") for k in a.keys]
        if keys and not a.namespace:
            raise SystemExit("kvctl: evict KEY... needs --namespace")
        r = self.call("Evict", admin_pb2.EvictRequest(namespace_id=_hex(a.namespace, "namespace") if a.namespace
                                                      else b"", keys=keys, tier=_TIERS[a.tier] if a.tier else 0))
        self.out({"evicted": r.evicted}, f"evicted {r.evicted} chunk(s)")

    def pin(self) -> None:
        a = self.args
        r = self.call("Pin", admin_pb2.PinRequest(namespace_id=_hex(a.namespace, "namespace"),
                                                  keys=[_hex(k, "key") for k in a.keys], ttl_s=a.ttl))
        self.out({"pinned": r.pinned}, f"pinned {r.pinned} chunk(s)" + (f" for {a.ttl}s" if a.ttl else ""))

    def unpin(self) -> None:
        a = self.args
        r = self.call("Unpin", admin_pb2.UnpinRequest(namespace_id=_hex(a.namespace, "namespace"),
                                                      keys=[_hex(k, "key") for k in a.keys]))
        self.out({"unpinned": r.unpinned}, f"unpinned {r.unpinned} chunk(s)")

    def clear(self) -> None:
        a = self.args
        if bool(a.namespace) == (a.tenant is not None):
            raise SystemExit("kvctl: clear needs exactly one of --namespace NS or --tenant T")
        req = (admin_pb2.ClearRequest(namespace_id=_hex(a.namespace, "namespace")) if a.namespace
               else admin_pb2.ClearRequest(tenant=a.tenant))
        r = self.call("Clear", req)
        self.out({"deleted": r.deleted}, f"deleted {r.deleted} chunk(s)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvctl", description="Administer a running kvstore daemon.")
    p.add_argument("--addr", default=os.environ.get("KVSTORE_ADDR", DEFAULT_ADDR),
                   help=f"daemon address, host:port or unix:/path (default {DEFAULT_ADDR}, env KVSTORE_ADDR)")
    p.add_argument("--token", help="admin token (default: env KVSTORE_TOKEN)")
    p.add_argument("--tls-ca", default=os.environ.get("KVSTORE_TLS_CA"),
                   help="PEM CA that signs the daemon's certificate: use TLS (env KVSTORE_TLS_CA)")
    p.add_argument("--tls-cert", default=os.environ.get("KVSTORE_TLS_CERT"),
                   help="PEM client certificate for mutual TLS (env KVSTORE_TLS_CERT)")
    p.add_argument("--tls-key", default=os.environ.get("KVSTORE_TLS_KEY"),
                   help="PEM key of --tls-cert (env KVSTORE_TLS_KEY)")
    p.add_argument("--tls-server-name", help="name to verify the daemon's certificate against (default: the host)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="is the daemon up; version, uptime, chunk counts")
    sub.add_parser("stats", help="per-tier bytes, chunks, hits, misses, evictions, corrupt")
    sub.add_parser("namespaces", help="registered namespaces")
    s = sub.add_parser("ls", help="list stored keys")
    s.add_argument("--namespace", help="namespace id (hex); default all")
    s.add_argument("--tier", choices=sorted(_TIERS))
    s.add_argument("--limit", type=int, default=100)
    s.add_argument("--all", action="store_true", help="follow pages to the end")
    s = sub.add_parser("inspect", help="one key's metadata")
    s.add_argument("namespace")
    s.add_argument("key")
    s = sub.add_parser("evict", help="evict keys (from --tier or all tiers), or empty a whole --tier")
    s.add_argument("keys", nargs="*")
    s.add_argument("--namespace")
    s.add_argument("--tier", choices=sorted(_TIERS))
    for name in ("pin", "unpin"):
        s = sub.add_parser(name, help=f"{name} keys" + (" (protect from eviction)" if name == "pin" else ""))
        s.add_argument("namespace")
        s.add_argument("keys", nargs="+")
        if name == "pin":
            s.add_argument("--ttl", type=int, default=0, help="seconds (default: until unpinned)")
    s = sub.add_parser("clear", help="delete every chunk of a namespace, or every namespace of a tenant")
    s.add_argument("--namespace")
    s.add_argument("--tenant")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    ctl = Ctl(args)
    try:
        getattr(ctl, args.command)()
    except grpc.RpcError as e:
        code = e.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            print(f"kvctl: cannot reach kvstore at {args.addr}: is the daemon running? start it with "
                  "`kvstore serve`", file=sys.stderr)
            return EXIT_UNREACHABLE
        print(f"kvctl: {code.name}: {e.details()}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        ctl.channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
