"""Package boundaries: the daemon and the client share only the wire and native packages.

Static: every module's ``import`` / ``from ... import`` statements (at any depth, including
the lazy ones inside functions) are read from its AST. Dynamic: importing the client in a
fresh interpreter loads no daemon module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: package directory -> top-level packages its modules must never import.
FORBIDDEN = {
    "kvstore": {"kvstore_client"},
    "client/kvstore_client": {"kvstore"},
    "wire/kvstore_wire": {"kvstore", "kvstore_client"},
    "native/kvstore_native": {"kvstore", "kvstore_client"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def _cases():
    for pkg, banned in FORBIDDEN.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield pytest.param(path, banned, id=str(path.relative_to(ROOT)))


def test_every_package_is_scanned():
    for pkg in FORBIDDEN:
        assert any((ROOT / pkg).rglob("*.py")), f"{pkg} has no modules: the scan would pass vacuously"


@pytest.mark.parametrize("path,banned", list(_cases()))
def test_module_respects_the_package_boundary(path: Path, banned: set[str]):
    bad = [f"{path.relative_to(ROOT)}:{line} imports {top}" for line, top in imported_packages(path) if top in banned]
    assert not bad, "\n".join(bad) + "\n(daemon and client may share only kvstore_wire and kvstore_native)"


def test_importing_the_client_loads_no_daemon_module():
    code = ("import sys, kvstore_client, kvstore_client.aio, kvstore_client.local; "
            "print(','.join(sorted(m for m in sys.modules if m == 'kvstore' or m.startswith('kvstore.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "", f"import kvstore_client loaded daemon modules: {out.stdout.strip()}"
