"""TLS listeners, client-certificate identities and the bearer-token transport rule (issue 8)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import grpc
import pytest

from kvstore.config import AuthConfig
from kvstore.server.auth import Authenticator, Peer, Transport
from kvstore.errors import Unauthenticated
from kvstore_wire._proto.kvstore.v1 import common_pb2, data_pb2
from kvstore_wire.channel import InsecureTransportError, TlsOptions, auth_metadata, open_channel

from .certs import make_pki
from .conftest import ALICE, OPS, SMALL, md, write_tokens

SPEC = common_pb2.NamespaceSpec(model="tls/m", dtype=1, num_layers=2, num_kv_heads=1, head_dim=8)


def _start(tmp_path, settings: list[str], probe: TlsOptions):
    from kvstore_testing.daemon import DaemonProcess
    from kvstore_testing.ports import free_port

    class _Proc(DaemonProcess):
        def wait_serving(self) -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited:\n{self.log()}")
                with open_channel(self.listen, tls=probe) as ch:
                    try:
                        grpc.channel_ready_future(ch).result(timeout=1)
                        return
                    except grpc.FutureTimeoutError:
                        pass
            raise RuntimeError(f"daemon not ready:\n{self.log()}")

    d = _Proc(tmp_path / "data", f"127.0.0.1:{free_port()}", tmp_path / "daemon.log", list(SMALL) + settings)
    return d.start()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_daemon(tmp_path_factory, pki):
    base = tmp_path_factory.mktemp("mtls")
    tokens = write_tokens(base / "tokens.toml")
    eng_cert, eng_key = pki.clients["engine"]
    d = _start(base, [f'auth.tokens_file="{tokens}"', f'server.tls.cert_file="{pki.server_cert}"',
                      f'server.tls.key_file="{pki.server_key}"', f'server.tls.client_ca_file="{pki.ca}"',
                      "server.tls.require_client_cert=true",
                      'auth.certs={"spiffe://test/engine-a" = {tenant = "engine-a"}, '
                      '"ops-cli" = {tenant = "ops", admin = true}}'],
               TlsOptions(ca_file=pki.ca, cert_file=eng_cert, key_file=eng_key))
    yield d
    d.stop()


def _register(tls: TlsOptions, addr: str, metadata=()):
    with open_channel(addr, tls=tls) as ch:
        reg = ch.unary_unary("/kvstore.v1.KVStore/RegisterNamespace",
                             data_pb2.RegisterNamespaceRequest.SerializeToString,
                             data_pb2.RegisterNamespaceResponse.FromString)
        return reg(data_pb2.RegisterNamespaceRequest(spec=SPEC), metadata=metadata, timeout=10)


def test_good_client_cert_is_the_mapped_tenant(mtls_daemon, pki):
    cert, key = pki.clients["engine"]
    r = _register(TlsOptions(ca_file=pki.ca, cert_file=cert, key_file=key), mtls_daemon.addr)
    assert r.namespace.tenant == "engine-a"


def test_token_over_mtls_takes_precedence(mtls_daemon, pki):
    cert, key = pki.clients["engine"]
    r = _register(TlsOptions(ca_file=pki.ca, cert_file=cert, key_file=key), mtls_daemon.addr, md(ALICE))
    assert r.namespace.tenant == "alice"


def test_wrong_ca_fails_the_handshake(mtls_daemon, pki):
    cert, key = pki.clients["rogue"]
    with pytest.raises(grpc.RpcError) as e:
        _register(TlsOptions(ca_file=pki.ca, cert_file=cert, key_file=key), mtls_daemon.addr)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_missing_client_cert_fails_the_handshake(mtls_daemon, pki):
    with pytest.raises(grpc.RpcError) as e:
        _register(TlsOptions(ca_file=pki.ca), mtls_daemon.addr, md(ALICE))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_to_tls_listener_fails(mtls_daemon):
    with pytest.raises(grpc.RpcError) as e:
        _register(None, mtls_daemon.addr)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_unmapped_cert_is_unauthenticated(mtls_daemon, pki):
    cert, key = pki.clients["stranger"]
    with pytest.raises(grpc.RpcError) as e:
        _register(TlsOptions(ca_file=pki.ca, cert_file=cert, key_file=key), mtls_daemon.addr)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "auth.certs" in e.value.details()


def test_cert_rights_apply(mtls_daemon, pki):
    cert, key = pki.clients["engine"]
    with open_channel(mtls_daemon.addr, tls=TlsOptions(ca_file=pki.ca, cert_file=cert, key_file=key)) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/kvstore.v1.Admin/GetStats")(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_kvctl_with_tls_options(mtls_daemon, pki):
    cert, key = pki.clients["ops"]
    r = subprocess.run([sys.executable, "-m", "kvstore.cli.kvctl", "--addr", mtls_daemon.addr, "--tls-ca", str(pki.ca),
                        "--tls-cert", str(cert), "--tls-key", str(key), "--json", "stats"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_server_only_tls_with_token(tmp_path, pki):
    tokens = write_tokens(tmp_path / "tokens.toml")
    d = _start(tmp_path, [f'auth.tokens_file="{tokens}"', f'server.tls.cert_file="{pki.server_cert}"',
                          f'server.tls.key_file="{pki.server_key}"'], TlsOptions(ca_file=pki.ca))
    try:
        assert _register(TlsOptions(ca_file=pki.ca), d.addr, md(ALICE)).namespace.tenant == "alice"
        r = subprocess.run([sys.executable, "-m", "kvstore.cli.kvctl", "--addr", d.addr, "--tls-ca", str(pki.ca),
                            "--token", OPS, "namespaces"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "tls/m" in r.stdout, r.stderr
    finally:
        d.stop()


# ---------------------------------------------------------------------- the bearer-token transport rule
def _auth() -> Authenticator:
    return Authenticator(AuthConfig(tokens={ALICE: {"tenant": "alice"}}))


def test_peer_parsing():
    assert Peer.from_grpc("ipv4:127.0.0.1:5000", {}).transport is Transport.LOOPBACK
    assert Peer.from_grpc("ipv6:[::1]:5000", {}).transport is Transport.LOOPBACK
    assert Peer.from_grpc("unix:/run/kvstore.sock", {}).transport is Transport.UNIX
    assert Peer.from_grpc("ipv4:10.1.2.3:5000", {}).transport is Transport.PLAINTEXT_REMOTE
    p = Peer.from_grpc("ipv4:10.1.2.3:5000", {"transport_security_type": [b"ssl"],
                                              "x509_common_name": [b"engine-a"]})
    assert p.transport is Transport.TLS and p.cert_identities == ("engine-a",)


def test_token_refused_on_plaintext_remote():
    a = _auth()
    assert a.authenticate(md(ALICE), Peer(Transport.LOOPBACK)).tenant == "alice"
    assert a.authenticate(md(ALICE), Peer(Transport.TLS)).tenant == "alice"
    assert a.authenticate(md(ALICE), Peer(Transport.UNIX)).tenant == "alice"
    with pytest.raises(Unauthenticated, match="enable TLS"):
        a.authenticate(md(ALICE), Peer(Transport.PLAINTEXT_REMOTE))


def test_cert_identities_ignored_unless_verified():
    cfg = AuthConfig(certs={"engine-a": {"tenant": "engine-a"}})
    peer = Peer(Transport.TLS, ("engine-a",))
    with pytest.raises(Unauthenticated):
        Authenticator(cfg, trust_cert_identities=False).authenticate((), peer)
    assert Authenticator(cfg, trust_cert_identities=True).authenticate((), peer).tenant == "engine-a"


def test_client_refuses_token_in_plaintext_to_another_host():
    assert auth_metadata(ALICE, "127.0.0.1:1", None)
    assert auth_metadata(ALICE, "unix:/x.sock", None)
    assert auth_metadata(ALICE, "10.0.0.1:1", TlsOptions())
    with pytest.raises(InsecureTransportError, match="plaintext"):
        auth_metadata(ALICE, "10.0.0.1:1", None)


def _non_loopback_ip() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_daemon_refuses_token_over_plaintext_non_loopback(tmp_path):
    from kvstore_testing.daemon import DaemonProcess
    from kvstore_testing.ports import free_port

    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    port = free_port()
    tokens = write_tokens(tmp_path / "tokens.toml")
    d = DaemonProcess(tmp_path / "data", f"0.0.0.0:{port}", tmp_path / "daemon.log",
                      list(SMALL) + [f'auth.tokens_file="{tokens}"']).start()
    try:
        with grpc.insecure_channel(f"{ip}:{port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary("/kvstore.v1.KVStore/RegisterNamespace")(
                    data_pb2.RegisterNamespaceRequest(spec=SPEC).SerializeToString(), metadata=md(ALICE), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "enable TLS" in e.value.details()
    finally:
        d.stop()


def test_client_library_over_mtls(mtls_daemon, pki):
    """KVStoreClient / AsyncKVStoreClient take the same TLS options as kvctl."""
    import asyncio

    import numpy as np

    from kvstore_client import KVStoreClient
    from kvstore_client.aio import AsyncKVStoreClient

    cert, key = pki.clients["engine"]
    tls = TlsOptions(ca_file=pki.ca, cert_file=cert, key_file=key)
    ns = dict(model="tls/client", dtype="float16", num_layers=2, num_kv_heads=1, head_dim=8, chunk_tokens=16)
    tokens = list(range(32))
    with KVStoreClient(mtls_daemon.addr, ns, tls=tls, local=False) as c:
        kv = np.random.default_rng(0).standard_normal((2, 2, 32, 1, 8)).astype(np.float16)
        c.store(tokens, kv)
        n, kv2 = c.retrieve(tokens)
        assert n == 32 and np.array_equal(kv2, kv)

    async def aio_lookup():
        c = await AsyncKVStoreClient.connect(mtls_daemon.addr, ns, tls=tls, local=False)
        try:
            return (await c.lookup(tokens)).matched_tokens
        finally:
            await c.close()

    assert asyncio.run(aio_lookup()) == 32


def test_vllm_connector_link_over_mutual_tls(mtls_daemon, pki):
    """The vLLM connector's sidecar link with ``kvstore.tls`` (no vLLM needed): a client
    certificate identifies the engine's tenant; chunks stored through the link come back; a
    link whose CA does not sign the daemon's certificate is a miss, never an engine error."""
    import numpy as np

    from kvstore_client.engines.vllm.config import ConnectorConfig
    from kvstore_client.engines.vllm.link import SidecarLink
    from kvstore_wire.keys import Namespace

    cert, key = pki.clients["engine"]
    ns = Namespace(model="tls/vllm", dtype="float16", num_layers=2, num_kv_heads=1, head_dim=8, chunk_tokens=16)
    cfg = ConnectorConfig.from_extra_config({"kvstore.addr": mtls_daemon.addr, "kvstore.tls": {
        "ca_file": str(pki.ca), "cert_file": str(cert), "key_file": str(key)}})
    link = SidecarLink(cfg, ns)
    toks = list(range(40))
    kv = np.random.default_rng(0).standard_normal((2, 2, 40, 1, 8)).astype(np.float16)
    try:
        assert link.call(lambda c: c.namespace.tenant, "") == "engine-a"
        assert link.call(lambda c: c.store(toks, kv, include_partial=True), 0) == 3
        assert link.call(lambda c: c.lookup(toks, include_partial=True).matched_tokens, 0) == 40
    finally:
        link.close()
    rogue_cert, rogue_key = pki.clients["rogue"]
    bad = SidecarLink(ConnectorConfig.from_extra_config({"kvstore.addr": mtls_daemon.addr, "kvstore.timeout_s": 5,
                                                         "kvstore.tls": {"ca_file": str(pki.ca),
                                                                         "cert_file": str(rogue_cert),
                                                                         "key_file": str(rogue_key)}}), ns)
    try:
        assert bad.call(lambda c: c.lookup(toks).matched_tokens, -1) == -1
        assert bad.failures >= 1
    finally:
        bad.close()
