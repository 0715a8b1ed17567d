"""Packages of the root distribution: the ``kvstore`` daemon (every directory with an
``__init__.py`` under ``kvstore/``) and the shared test, benchmark and demo helpers
``kvstore_testing`` (under ``testing/``). The wire contract (``wire/``), the native library
(``native/``) and the client (``client/``) are distributions of their own; see the README for
the install line."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
#: import name -> source directory, relative to this file.
PACKAGE_DIRS = {"kvstore": "kvstore", "kvstore_testing": "testing/kvstore_testing"}


def _packages(name: str, directory: str) -> list[str]:
    base = ROOT / directory
    return [".".join([name, *p.parent.relative_to(base).parts]) for p in sorted(base.rglob("__init__.py"))]


setup(packages=[pkg for name, d in PACKAGE_DIRS.items() for pkg in _packages(name, d)], package_dir=PACKAGE_DIRS)
