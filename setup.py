"""Packages of the ``kvstore`` daemon distribution (every directory with an ``__init__.py``
under ``kvstore/``). The wire contract (``wire/``), the native library (``native/``) and the
client (``client/``) are distributions of their own; see the README for the install line."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PACKAGES = [".".join(["kvstore", *p.parent.relative_to(ROOT / "kvstore").parts])
            for p in sorted((ROOT / "kvstore").rglob("__init__.py"))]

setup(packages=PACKAGES)
