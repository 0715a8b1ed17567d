"""The client distribution installs and works alone: a fresh virtual environment (no system
site packages) gets only ``kvstore-wire`` and ``kvstore-client`` (grpcio, protobuf, numpy
from PyPI), has no daemon package, no lmdb, no pydantic and no native library, and
round-trips chunks bit-exactly against a real daemon, on the same-host and stream paths,
sync and async, with CRC verification on.

The wheels are built from copies of ``wire/``, ``client/`` and ``proto/`` by this
environment's pip (``--no-build-isolation``: its setuptools and grpcio-tools do the build,
so the test needs PyPI only for the three runtime dependencies); the venv is built once per
session, without a pip of its own (this environment's ``pip --python`` installs into it).
``pip install ./wire ./client`` with build isolation does the same from PyPI alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Building the venv downloads three wheels; a slow mirror still finishes well inside this.
PIP_TIMEOUT_S = 300
SCRIPT_TIMEOUT_S = 120
_COPY_IGNORE = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "_proto", ".stamp")


def clean_env() -> dict[str, str]:
    """This process's environment without what would leak the developer's packages in."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("KVSTORE_")}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: list, timeout_s: float, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout_s, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def client_venv(tmp_path_factory) -> Path:
    """``bin/python`` of a fresh venv holding only the client distributions and their deps."""
    base = tmp_path_factory.mktemp("client-alone")
    src = base / "src"
    for d in ("wire", "client", "proto"):
        shutil.copytree(ROOT / d, src / d, ignore=_COPY_IGNORE)
    wheels = base / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels,
          src / "wire", src / "client"], PIP_TIMEOUT_S, env={**clean_env(), "PYTHONPATH": ""})
    venv = base / "venv"
    # A clean venv without its own pip (ensurepip costs seconds): this pip installs into it.
    _run([sys.executable, "-m", "venv", "--without-pip", venv], PIP_TIMEOUT_S, env=clean_env())
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", *sorted(wheels.glob("*.whl"))],
         PIP_TIMEOUT_S, env=clean_env())
    return py


def test_client_venv_has_no_daemon_side_packages(client_venv):
    code = textwrap.dedent("""
        import importlib, json, sys
        res = {}
        for m in ("kvstore", "lmdb", "pydantic", "kvstore_native", "kvstore_client", "kvstore_wire"):
            try:
                importlib.import_module(m)
                res[m] = True
            except ImportError:
                res[m] = False
        res["no_system_site"] = not any("site-packages" in p and not p.startswith(sys.prefix) for p in sys.path)
        print(json.dumps(res))
    """)
    res = json.loads(_run([client_venv, "-c", code], SCRIPT_TIMEOUT_S, env=clean_env(), cwd="/").stdout)
    assert res == {"kvstore": False, "lmdb": False, "pydantic": False, "kvstore_native": False,
                   "kvstore_client": True, "kvstore_wire": True, "no_system_site": True}, res


ROUND_TRIP = textwrap.dedent("""
    import asyncio, json, sys
    from dataclasses import replace
    import numpy as np
    import kvstore_wire.crc as crc
    from kvstore_client import AsyncKVStoreClient, KVStoreClient, Namespace

    addr = sys.argv[1]
    calls = {"n": 0}
    real = crc.crc32c
    def counting(data, value=0):          # a spy: counts, then computes the real CRC
        calls["n"] += 1
        return real(data, value)
    crc.crc32c = counting

    ns = Namespace(model="client-alone", dtype="float16", num_layers=2, num_kv_heads=2, head_dim=16,
                   chunk_tokens=32)
    toks = list(range(32 * 3 + 5))
    kv = np.random.default_rng(7).standard_normal(ns.chunk_shape(len(toks))).astype(np.float16)
    out = {"backend": crc.BACKEND if hasattr(crc, "BACKEND") else None}

    for local in (None, False):
        with KVStoreClient(addr, replace(ns, model=f"client-alone-{local}"), local=local) as c:
            stored = c.store(toks, kv)
            hit = c.lookup(toks)
            before = calls["n"]
            n, got = c.retrieve(toks)
            buf = np.zeros(ns.chunk_shape(96), np.float16)
            m = c.retrieve_into(toks, buf)
            out[c.transport] = {"stored": stored, "matched": hit.matched_tokens, "n": n, "m": m,
                                "exact": bool(np.array_equal(got, kv[:, :, :96]) and np.array_equal(buf, got)),
                                "crc_calls": calls["n"] - before, "crc_backend": c.crc_backend}

    async def aio():
        async with await AsyncKVStoreClient.connect(addr, replace(ns, model="client-alone-aio")) as c:
            stored = await c.store(toks, kv)
            buf = np.zeros(ns.chunk_shape(96), np.float16)
            m = await c.retrieve_into(toks, buf)
            return {"transport": c.transport, "stored": stored, "m": m, "exact": bool(np.array_equal(buf, kv[:, :, :96]))}

    out["aio"] = asyncio.run(aio())
    print(json.dumps(out))
""")


def test_client_alone_round_trips_against_a_real_daemon(client_venv, daemon):
    proc = _run([client_venv, "-c", ROUND_TRIP, daemon.addr], SCRIPT_TIMEOUT_S, env=clean_env(), cwd="/")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for transport in ("shm", "grpc"):
        r = res[transport]
        assert (r["stored"], r["matched"], r["n"], r["m"], r["exact"]) == (3, 96, 96, 96, True), (transport, r)
        # The client reports kvstore_wire.crc.BACKEND (where that module defines it).
        assert r["crc_backend"] and r["crc_backend"] == (res["backend"] or r["crc_backend"]), res
    # The stream path verifies every received chunk (here without the native library).
    assert res["grpc"]["crc_calls"] > 0
    assert res["aio"] == {"transport": "shm", "stored": 3, "m": 96, "exact": True}
