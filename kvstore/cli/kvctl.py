"""``kvctl``: the operator's CLI for a running kvstore daemon.

    kvctl [--addr ADDR] [--token T] [--json] [--timeout S] COMMAND ...   (options anywhere)

Commands: status, stats, namespaces, ls, inspect, evict, pin, unpin, clear, verify. Namespace
ids and keys are hex; a unique prefix of a namespace id (or of a key) is enough, like git.
Tables by default; ``--json`` prints one JSON object per command (schema: kvctl_output).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import grpc

from kvstore_wire._proto.kvstore.v1 import admin_pb2, admin_pb2_grpc
from kvstore_wire.types import Tier

from .kvctl_output import Progress, enum_name, size, table, to_json

DEFAULT_ADDR = "127.0.0.1:50051"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_CODES = f"""exit status:
  {EXIT_OK}  ok
  {EXIT_ERROR}  nothing matched (no such namespace or key, nothing evicted/pinned/deleted, verify found
     damaged chunks), or the daemon refused the request (the message says why)
  {EXIT_USAGE}  usage error (bad arguments, ambiguous prefix) or the daemon cannot be reached"""
_TIERS = {"dram": Tier.DRAM, "disk": Tier.DISK, "hbm": Tier.HBM, "remote": Tier.REMOTE}
ID_HEX = 64
#: Keys per Evict/Pin request when many are given (below the daemon's max_keys_per_request).
BATCH_KEYS = 1024
#: Seconds to wait for the channel's connectivity state after a failed call.
STATE_WAIT_S = 1.0
_TIER_FIELD = admin_pb2.TierStats.DESCRIPTOR.fields_by_name["tier"]


class Exit(Exception):
    """Ends kvctl with ``status`` after printing ``message`` on stderr."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _hexarg(s: str, what: str) -> str:
    s = s.strip().lower()
    if not s or len(s) > ID_HEX or any(c not in "0123456789abcdef" for c in s):
        raise Exit(EXIT_USAGE, f"kvctl: {what} must be hex (a prefix of up to {ID_HEX} digits), got {s!r}")
    return s


def _remote_lines(st, sep: str) -> str:
    """The remote tier's and the events publisher's lines of ``status`` / ``stats`` ("" without them)."""
    out = ""
    if st.HasField("remote"):
        r = st.remote
        levels = ", ".join(f"{k} {v}" for k, v in sorted(r.level_decisions.items())) or "-"
        out += (f"{sep}remote: {size(r.bytes_read)} read, {size(r.bytes_written)} written, hit rate "
                f"{100 * r.hit_rate:.1f}% ({r.hits} hits, {r.misses} misses), {r.corrupt} corrupt, {r.errors} errors, "
                f"link {r.throughput_bytes_per_s * 8 / 1e9:.2f} Gbit/s"
                f"{sep}uploads: {r.upload_queued} queued, {r.uploaded} uploaded, {r.upload_deduplicated} already there, "
                f"{r.uploads_skipped} skipped (queue full), {r.quota_rejections} over quota"
                f"{sep}levels chosen: {levels}")
    if st.HasField("events"):
        e = st.events
        out += (f"{sep}events: {e.published_batches} batches / {e.published_events} events published, "
                f"{e.dropped_events} dropped, {e.resyncs} resyncs, {e.snapshots} snapshots")
    return out


def _tier(t: int) -> str:
    return str(enum_name(_TIER_FIELD, t))


def _pick(prefix: str, candidates: list[str], what: str) -> bytes:
    hits = [c for c in candidates if c.startswith(prefix)]
    if not hits:
        raise Exit(EXIT_ERROR, f"kvctl: no {what} starts with {prefix}")
    if len(hits) > 1:
        shown = "\n  ".join(hits[:20]) + ("\n  ..." if len(hits) > 20 else "")
        raise Exit(EXIT_USAGE, f"kvctl: {what} prefix {prefix} is ambiguous; it matches:\n  {shown}")
    return bytes.fromhex(hits[0])


def _channel(args) -> tuple[grpc.Channel, tuple]:
    """The channel to the daemon and the call metadata (the token), from the --tls-* and --token options."""
    from kvstore_wire.channel import InsecureTransportError, TlsOptions, auth_metadata, open_channel

    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name:
        try:
            tls = TlsOptions(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key,
                             server_name=args.tls_server_name)
        except ValueError as e:
            raise Exit(EXIT_USAGE, f"kvctl: {e}") from None
    try:
        md = auth_metadata(args.token or os.environ.get("KVSTORE_TOKEN"), args.addr, tls)
        return open_channel(args.addr, tls=tls), md
    except (InsecureTransportError, ValueError) as e:
        raise Exit(EXIT_USAGE, f"kvctl: {e}") from None


class Ctl:
    def __init__(self, args) -> None:
        self.args = args
        self.channel, self.md = _channel(args)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    def channel_state_down(self) -> bool:
        """After an UNAVAILABLE: True when there is no connection to the daemon (not running,
        wrong address), False when the daemon itself answered UNAVAILABLE."""
        seen: list[grpc.ChannelConnectivity] = []
        got = threading.Event()

        def note(state):
            seen.append(state)
            got.set()
        self.channel.subscribe(note, try_to_connect=False)
        got.wait(STATE_WAIT_S)
        self.channel.unsubscribe(note)
        return not seen or seen[-1] != grpc.ChannelConnectivity.READY

    def call(self, method: str, request):
        return getattr(self.admin, method)(request, metadata=self.md, timeout=self.args.timeout)

    def out(self, obj: dict, human: str, matched: bool = True) -> None:
        print(json.dumps(obj, indent=2, sort_keys=True) if self.args.json else human)
        if not matched:
            raise Exit(EXIT_ERROR, "")

    # ------------------------------------------------------------------ id resolution
    def namespace(self, arg: str) -> bytes:
        """A namespace id from a full id or a unique prefix of one."""
        p = _hexarg(arg, "namespace")
        if len(p) == ID_HEX:
            return bytes.fromhex(p)
        ids = [n.namespace_id.hex() for n in self.call("ListNamespaces", admin_pb2.ListNamespacesRequest()).namespaces]
        return _pick(p, ids, "namespace id")

    def keys(self, nid: bytes, args: list[str]) -> list[bytes]:
        """Keys from full keys or unique prefixes (prefixes are resolved against the namespace's keys)."""
        ps = [_hexarg(a, "key") for a in args]
        known: list[str] | None = None
        out = []
        for p in ps:
            if len(p) == ID_HEX:
                out.append(bytes.fromhex(p))
                continue
            if known is None:
                known = [e.key.hex() for e in self._list(nid, 0, 0, every=True)[0]]
            out.append(_pick(p, known, "key"))
        return out

    def _list(self, nid: bytes, tier: int, limit: int, every: bool):
        req = admin_pb2.ListKeysRequest(namespace_id=nid, tier=tier, limit=limit)
        entries = []
        with Progress("listing", 0) as bar:
            while True:
                r = self.call("ListKeys", req)
                entries.extend(r.entries)
                bar.update(len(entries), len(entries) + (1 if r.next_page_token else 0))
                if not r.next_page_token or not every:
                    return entries, bool(r.next_page_token)
                req.page_token = r.next_page_token

    # ------------------------------------------------------------------ commands
    def status(self) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        h = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                          timeout=self.args.timeout)
        health = health_pb2.HealthCheckResponse.ServingStatus.Name(h.status).lower()
        stats, why = None, None
        try:   # the health check needs no token; the numbers need an admin one when auth is on
            stats = self.call("GetStats", admin_pb2.GetStatsRequest())
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise
            why = f"{e.code().name.lower()}: pass an admin --token for details"
        obj = {"addr": self.args.addr, "health": health, "stats": to_json(stats) if stats is not None else None,
               "stats_error": why}
        human = f"kvstore at {self.args.addr}: {health}"
        if stats is not None:
            tiers = ", ".join(f"{_tier(t.tier)} {t.chunks} chunks / {size(t.used_bytes)} of "
                              f"{size(t.capacity_bytes)}" for t in stats.tiers)
            human += f", version {stats.version}, up {stats.uptime_s:.0f}s, {stats.namespaces} namespaces\n  {tiers}"
            human += _remote_lines(stats, "\n  ")
        else:
            human += f" ({why})"
        self.out(obj, human, matched=health == "serving")

    def stats(self) -> None:
        st = self.call("GetStats", admin_pb2.GetStatsRequest())
        rows = []
        for t in st.tiers:
            reads = t.hits + t.misses
            rows.append([_tier(t.tier), t.policy, size(t.capacity_bytes), size(t.used_bytes), t.chunks,
                         t.pinned_chunks, t.hits, t.misses, f"{100 * t.hits / reads:.1f}%" if reads else "-",
                         t.evictions, t.corrupt])
        human = table(rows, ["tier", "policy", "capacity", "used", "chunks", "pinned", "hits", "misses", "hit rate",
                             "evictions", "corrupt"])
        human += f"\nwrite queue: {st.write_queue_depth} waiting, {st.write_queue_dropped} dropped"
        human += _remote_lines(st, "\n")
        self.out(to_json(st), human)

    def tenants(self) -> None:
        st = self.call("GetStats", admin_pb2.GetStatsRequest())
        rows = []
        for t in st.tenants:
            for q in t.quotas:
                if not q.used and q.unlimited:
                    continue
                bytes_ = q.quota.endswith("_bytes")
                used = size(q.used) if bytes_ else q.used
                limit = "unlimited" if q.unlimited else (size(q.limit) if bytes_ else q.limit)
                share = f"{100 * q.used / q.limit:.1f}%" if not q.unlimited and q.limit else "-"
                rows.append([t.tenant, q.quota, used, limit, share])
        self.out({"tenants": [to_json(t) for t in st.tenants]}, table(rows, ["tenant", "quota", "used", "limit",
                                                                             "of limit"]), matched=bool(st.tenants))

    def namespaces(self) -> None:
        r = self.call("ListNamespaces", admin_pb2.ListNamespacesRequest())
        rows = [[n.namespace_id.hex(), n.tenant or "-", n.spec.model, enum_name(
                 n.spec.DESCRIPTOR.fields_by_name["dtype"], n.spec.dtype), n.spec.num_layers, n.spec.num_kv_heads,
                 n.spec.head_dim, n.spec.chunk_tokens, f"{n.spec.tp_rank}/{n.spec.tp_size}", size(n.chunk_bytes)]
                for n in r.namespaces]
        self.out(to_json(r), table(rows, ["namespace", "tenant", "model", "dtype", "layers", "kv_heads", "head_dim",
                                          "chunk_tokens", "tp", "chunk size"]), matched=bool(r.namespaces))

    def ls(self) -> None:
        a = self.args
        nid = self.namespace(a.namespace) if a.namespace else b""
        entries, more = self._list(nid, _TIERS[a.tier] if a.tier else 0, a.limit, a.all)
        rows = [[e.namespace_id.hex(), e.key.hex(), ",".join(_tier(t) for t in e.tiers), e.num_tokens,
                 size(e.payload_bytes), "yes" if e.pinned else "", e.hits] for e in entries]
        human = table(rows, ["namespace", "key", "tiers", "tokens", "size", "pinned", "hits"])
        if more:
            human += "\n(more keys: use --all or a larger --limit)"
        self.out({"keys": [to_json(e) for e in entries], "more": more}, human, matched=bool(entries))

    def inspect(self) -> None:
        nid = self.namespace(self.args.namespace)
        (key,) = self.keys(nid, [self.args.key])
        r = self.call("Inspect", admin_pb2.InspectRequest(namespace_id=nid, key=key))
        e, ns, obj = r.entry, r.namespace, to_json(r)
        when = lambda s: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s)) if s else "-"  # noqa: E731
        human = "\n".join([
            f"key          {e.key.hex()}", f"namespace    {ns.namespace_id.hex()} ({ns.spec.model}, tenant "
                                           f"{ns.tenant or '-'})",
            f"tiers        {', '.join(obj['entry']['tiers'])}", f"tokens       {e.num_tokens}",
            f"size         {size(e.payload_bytes)} ({e.payload_bytes} bytes)",
            f"encoding     {obj['entry']['encoding']}", f"key kind     {obj['entry']['key_kind']}",
            f"pinned       {'yes' if e.pinned else 'no'}"
            + (f" until {when(e.pin_expires_unix_s)}" if e.pin_expires_unix_s else ""),
            f"created      {when(e.created_unix_s)}", f"last access  {when(e.last_access_unix_s)}",
            f"hits         {e.hits}"])
        self.out(obj, human)

    def _batched(self, label: str, method: str, keys: list[bytes], make, field: str) -> int:
        n = 0
        with Progress(label, len(keys)) as bar:
            for i in range(0, len(keys), BATCH_KEYS):
                n += getattr(self.call(method, make(keys[i:i + BATCH_KEYS])), field)
                bar.update(min(i + BATCH_KEYS, len(keys)))
        return n

    def evict(self) -> None:
        a = self.args
        tier = _TIERS[a.tier] if a.tier else 0
        if a.keys and not a.namespace:
            raise Exit(EXIT_USAGE, "kvctl: evict KEY... needs --namespace")
        if a.keys:
            nid = self.namespace(a.namespace)
            n = self._batched("evicting", "Evict", self.keys(nid, a.keys),
                              lambda ks: admin_pb2.EvictRequest(namespace_id=nid, keys=ks, tier=tier), "evicted")
        else:
            n = self.call("Evict", admin_pb2.EvictRequest(tier=tier)).evicted
        self.out({"evicted": n}, f"evicted {n} chunk(s)", matched=n > 0)

    def pin(self) -> None:
        a = self.args
        nid = self.namespace(a.namespace)
        n = self._batched("pinning", "Pin", self.keys(nid, a.keys),
                          lambda ks: admin_pb2.PinRequest(namespace_id=nid, keys=ks, ttl_s=a.ttl), "pinned")
        self.out({"pinned": n}, f"pinned {n} chunk(s)" + (f" for {a.ttl}s" if a.ttl else ""), matched=n > 0)

    def unpin(self) -> None:
        a = self.args
        nid = self.namespace(a.namespace)
        n = self._batched("unpinning", "Unpin", self.keys(nid, a.keys),
                          lambda ks: admin_pb2.UnpinRequest(namespace_id=nid, keys=ks), "unpinned")
        self.out({"unpinned": n}, f"unpinned {n} chunk(s)", matched=n > 0)

    def clear(self) -> None:
        a = self.args
        if bool(a.namespace) == (a.tenant is not None):
            raise Exit(EXIT_USAGE, "kvctl: clear needs exactly one of --namespace NS or --tenant T")
        if a.namespace:
            n = self.call("Clear", admin_pb2.ClearRequest(namespace_id=self.namespace(a.namespace))).deleted
        else:
            infos = [i for i in self.call("ListNamespaces", admin_pb2.ListNamespacesRequest()).namespaces
                     if i.tenant == a.tenant]
            n = 0
            with Progress(f"clearing tenant {a.tenant}", len(infos)) as bar:
                for k, info in enumerate(infos):
                    n += self.call("Clear", admin_pb2.ClearRequest(namespace_id=info.namespace_id)).deleted
                    bar.update(k + 1)
            n += self.call("Clear", admin_pb2.ClearRequest(tenant=a.tenant)).deleted   # and the registrations
        self.out({"deleted": n}, f"deleted {n} chunk(s)", matched=n > 0)

    def verify(self) -> None:
        last = admin_pb2.VerifyProgress(done=True)
        stream = self.admin.Verify(admin_pb2.VerifyRequest(), metadata=self.md)   # no deadline: may be long
        with Progress("verifying disk chunks", 0) as bar:
            for last in stream:
                bar.update(last.checked, last.total, f"{last.corrupt} corrupt, {size(last.bytes_checked)}")
        human = (f"verified {last.checked} disk chunks ({size(last.bytes_checked)}) in {last.seconds:.1f}s: "
                 f"{last.corrupt} damaged (removed)")
        self.out(to_json(last), human, matched=last.corrupt == 0)


def _common() -> argparse.ArgumentParser:
    """Global options, accepted before or after the command (``SUPPRESS``: absent leaves the default)."""
    c = argparse.ArgumentParser(add_help=False)
    S = argparse.SUPPRESS
    c.add_argument("--addr", default=S, help=f"daemon address, host:port or unix:/path (default {DEFAULT_ADDR}, "
                                             "env KVSTORE_ADDR)")
    c.add_argument("--token", default=S, help="admin token (default: env KVSTORE_TOKEN); status works without one")
    c.add_argument("--json", action="store_true", default=S, help="one JSON object on stdout")
    c.add_argument("--timeout", type=float, default=S, help="seconds per request (default 10)")
    c.add_argument("--tls-ca", default=S, help="PEM CA that signs the daemon's certificate: use TLS (env KVSTORE_TLS_CA)")
    c.add_argument("--tls-cert", default=S, help="PEM client certificate for mutual TLS (env KVSTORE_TLS_CERT)")
    c.add_argument("--tls-key", default=S, help="PEM key of --tls-cert (env KVSTORE_TLS_KEY)")
    c.add_argument("--tls-server-name", default=S, help="name to verify the daemon's certificate against "
                                                        "(default: the host)")
    return c


def _parser() -> argparse.ArgumentParser:
    common = _common()
    p = argparse.ArgumentParser(prog="kvctl", description="Administer a running kvstore daemon. Namespace ids and "
                                "keys are hex; a unique prefix is enough.", parents=[common], epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name, help_):
        return sub.add_parser(name, help=help_, parents=[common], epilog=EXIT_CODES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd("status", "is the daemon up (no token needed); version, uptime, chunk counts")
    cmd("stats", "per-tier bytes, chunks, hits, misses, evictions, corrupt")
    cmd("tenants", "what each tenant holds against its quotas (DRAM, disk, remote bytes, pins, leases, ...)")
    cmd("namespaces", "registered namespaces")
    s = cmd("ls", "list stored keys")
    s.add_argument("--namespace", help="namespace id or unique prefix; default all")
    s.add_argument("--tier", choices=sorted(_TIERS))
    s.add_argument("--limit", type=int, default=100)
    s.add_argument("--all", action="store_true", help="follow pages to the end")
    s = cmd("inspect", "one key's metadata")
    s.add_argument("namespace")
    s.add_argument("key")
    s = cmd("evict", "evict keys (from --tier or all tiers), or empty a whole --tier")
    s.add_argument("keys", nargs="*")
    s.add_argument("--namespace")
    s.add_argument("--tier", choices=sorted(_TIERS))
    for name in ("pin", "unpin"):
        s = cmd(name, f"{name} keys" + (" (protect from eviction)" if name == "pin" else ""))
        s.add_argument("namespace")
        s.add_argument("keys", nargs="+")
        if name == "pin":
            s.add_argument("--ttl", type=int, default=0, help="seconds (default: until unpinned)")
    s = cmd("clear", "delete every chunk of a namespace, or every namespace of a tenant")
    s.add_argument("--namespace")
    s.add_argument("--tenant")
    cmd("verify", "re-read every disk chunk and check its CRC now; damaged ones are removed")
    return p


def _defaults() -> dict:
    # Not ``set_defaults``: the global options' actions are shared with every subparser, whose
    # defaults would then overwrite a value given before the command.
    return {"addr": os.environ.get("KVSTORE_ADDR", DEFAULT_ADDR), "token": None, "json": False, "timeout": 10.0,
            "tls_ca": os.environ.get("KVSTORE_TLS_CA"), "tls_cert": os.environ.get("KVSTORE_TLS_CERT"),
            "tls_key": os.environ.get("KVSTORE_TLS_KEY"), "tls_server_name": None}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for k, v in _defaults().items():
        if not hasattr(args, k):
            setattr(args, k, v)
    ctl = Ctl(args)
    unreachable = (f"kvctl: cannot reach kvstore at {args.addr}: is the daemon running? start it with "
                   "`kvstore serve`")
    try:
        getattr(ctl, args.command)()
    except Exit as e:
        if str(e):
            print(e, file=sys.stderr)
        return e.status
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE and ctl.channel_state_down():
            print(unreachable, file=sys.stderr)
            return EXIT_USAGE
        print(f"kvctl: {code.name}: {' '.join(str(e.details()).split())}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("kvctl: interrupted", file=sys.stderr)
        return EXIT_ERROR
    finally:
        ctl.channel.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
