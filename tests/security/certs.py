"""Test PKI: a CA, a server certificate and client certificates, made with the ``cryptography``
package when installed, else the ``openssl`` command line (present on Debian)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    #: name -> (cert, key)
    clients: dict[str, tuple[Path, Path]]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _key_and_csr(d: Path, name: str, cn: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)


def _sign(d: Path, name: str, ca: str, san: str) -> None:
    (d / f"{name}.ext").write_text(f"subjectAltName = {san}\nbasicConstraints = CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}", "-days", "2", cwd=d)


def make_pki(d: Path) -> Pki:
    """CA ``ca``; server for localhost/127.0.0.1; clients ``engine`` (CN engine-a, SAN URI
    spiffe://test/engine-a), ``ops`` (CN ops-cli), ``stranger`` (CN nobody: signed by the CA but not
    mapped) and ``rogue`` (CN engine-a, signed by another CA)."""
    if shutil.which("openssl") is None:
        pytest.skip("neither the cryptography package nor the openssl command is available")
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _key_and_csr(d, "server", "localhost")
    _sign(d, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    clients = {}
    for name, cn, san, ca in (("engine", "engine-a", "URI:spiffe://test/engine-a", "ca"),
                              ("ops", "ops-cli", "DNS:ops-cli", "ca"),
                              ("stranger", "nobody", "DNS:nobody", "ca"),
                              ("rogue", "engine-a", "URI:spiffe://test/engine-a", "rogue-ca")):
        _key_and_csr(d, name, cn)
        _sign(d, name, ca, san)
        clients[name] = (d / f"{name}.crt", d / f"{name}.key")
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key", clients)
