"""Import boundaries between the distributions, and where the demo lives."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imported_roots(package_dir: Path) -> dict[str, set[str]]:
    """Top-level module names each file under ``package_dir`` imports (absolute imports only)."""
    out: dict[str, set[str]] = {}
    for path in package_dir.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize("package_dir, forbidden", [
    ("kvstore", {"kvstore_client", "kvstore_testing"}),
    ("client/kvstore_client", {"kvstore", "kvstore_testing"}),
    ("wire/kvstore_wire", {"kvstore", "kvstore_client", "kvstore_testing"}),
    ("native/kvstore_native", {"kvstore", "kvstore_client", "kvstore_testing"}),
])
def test_import_boundaries(package_dir, forbidden):
    bad = {f: sorted(names & forbidden) for f, names in _imported_roots(ROOT / package_dir).items()
           if names & forbidden}
    assert not bad, f"{package_dir} must not import {sorted(forbidden)}: {bad}"


def test_demo_runs_from_the_testing_package_not_the_daemon_cli():
    r = subprocess.run([sys.executable, "-m", "kvstore_testing.demo", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--spawn-daemon" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "kvstore.cli.daemon", "demo"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "invalid choice: 'demo'" in r.stderr
