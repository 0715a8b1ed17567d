"""Builds ``kvstore-native``: compiles every ``src/**/*.cpp`` / ``codec/**/*.cpp`` into
``kvstore_native/_lib/libkvstore.so`` (C ABI, loaded with ctypes so calls release the GIL)
and, where ``nvcc`` is found (and ``KVSTORE_NO_CUDA`` is not 1), every ``cuda/**/*.cu`` into
``kvstore_native/_lib/libkvstore_cuda.so`` for Hopper (sm_90). The libraries are written
into the source tree (so editable installs and in-tree runs work) and shipped as package data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
OUT = HERE / "kvstore_native" / "_lib"
SOURCE_DIRS = [HERE / d for d in ("src", "codec", "cuda", "include")]

CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-Wall", "-Wextra", "-pthread"]
# The lent GPUs are Hopper; one SASS target keeps the build fast and exact.
NVCCFLAGS = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
             "-gencode=arch=compute_90,code=sm_90", "-lineinfo"]
INCLUDES = [f"-I{HERE / 'include'}", f"-I{HERE / 'codec'}"]


def _files(pattern: str) -> list[Path]:
    return sorted(p for d in SOURCE_DIRS if d.is_dir() for p in d.rglob(pattern))


def _newer(sources: list[Path], target: Path) -> bool:
    if not target.exists():
        return True
    t = target.stat().st_mtime
    return any(s.stat().st_mtime > t for s in sources)


def _nvcc() -> str | None:
    if os.environ.get("KVSTORE_NO_CUDA") == "1":
        return None
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def build_native() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    hdrs = _files("*.h") + _files("*.cuh")
    srcs = _files("*.cpp")
    lib = OUT / "libkvstore.so"
    if srcs and _newer(srcs + hdrs, lib):
        cmd = [os.environ.get("CXX", "g++"), *CXXFLAGS, *INCLUDES, *map(str, srcs), "-o", str(lib)]
        print("building native library:", " ".join(cmd), file=sys.stderr)
        subprocess.check_call(cmd)
    cus = _files("*.cu")
    nvcc = _nvcc()
    cuda_lib = OUT / "libkvstore_cuda.so"
    if nvcc and cus and _newer(cus + hdrs, cuda_lib):
        cmd = [nvcc, *NVCCFLAGS, *INCLUDES, *map(str, cus), "-o", str(cuda_lib), "-lcudart"]
        print("building CUDA library:", " ".join(cmd), file=sys.stderr)
        subprocess.check_call(cmd)


# Editable installs and wheel builds alike: the libraries are (re)built when stale, before
# setuptools collects package data.
build_native()

setup(
    packages=["kvstore_native", "kvstore_native.codec"],
    package_data={"kvstore_native": ["_lib/*.so"]},
)
