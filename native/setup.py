"""Builds ``kvstore-native``: the one C ABI of ``include/kvstore.h`` in two shared libraries.

- ``kvstore_native/_lib/libkvstore.so`` (always): every ``src/**/*.cpp``, each compiled as its
  own translation unit, g++ -O3.
- ``kvstore_native/_lib/libkvstore_cuda.so`` (where ``nvcc`` is found and ``KVSTORE_NO_CUDA`` is
  not 1): every ``cuda/**/*.cu`` plus the host units it shares with the CPU library
  (``CUDA_HOST_UNITS``), for Hopper (sm_90); it links ``libkvstore.so`` (rpath ``$ORIGIN``) for
  ``kvs_crc32c``.
- ``KVSTORE_NATIVE_SANITIZE=1`` additionally builds ``libkvstore_asan.so`` (ASAN + UBSan, -O1 -g)
  for fuzzing: ``KVSTORE_NATIVE_LIB=.../libkvstore_asan.so`` makes the loader use it
  (bench/codec_fuzz.py says how to run it).

Only ``KVS_API`` symbols are exported (``-fvisibility=hidden``). The libraries are written into
the source tree (so editable installs and in-tree runs work) and shipped as package data.
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
SRC, CUDA, INCLUDE = HERE / "src", HERE / "cuda", HERE / "include"
# Host units of src/ that the CUDA library compiles in as well (container header/index, errors,
# the ABI version); CRC32C is not among them: the CUDA library links libkvstore.so for it.
CUDA_HOST_UNITS = [SRC / "abi.cpp", SRC / "error.cpp", SRC / "codec" / "format.cpp"]

CXXFLAGS = ["-std=c++17", "-fPIC", "-shared", "-Wall", "-Wextra", "-pthread", "-fvisibility=hidden"]
OPTFLAGS = ["-O3"]
SANFLAGS = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
# The lent GPUs are Hopper; one SASS target keeps the build fast and exact.
NVCCFLAGS = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
             "-gencode=arch=compute_90,code=sm_90", "-lineinfo"]
INCLUDES = [f"-I{INCLUDE}", f"-I{SRC}"]


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.rglob(pattern)) if root.is_dir() else []


def _headers() -> list[Path]:
    return [p for d in (INCLUDE, SRC, CUDA) for ext in ("*.h", "*.cuh") for p in _files(d, ext)]


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


def _run(what: str, cmd: list[str]) -> None:
    print(f"building {what}:", " ".join(cmd), file=sys.stderr)
    subprocess.check_call(cmd)


def build_native() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    hdrs = _headers()
    srcs = _files(SRC, "*.cpp")
    cxx = os.environ.get("CXX", "g++")
    lib = OUT / "libkvstore.so"
    if _newer(srcs + hdrs, lib):
        _run("native library", [cxx, *OPTFLAGS, *CXXFLAGS, *INCLUDES, *map(str, srcs), "-o", str(lib)])
    if os.environ.get("KVSTORE_NATIVE_SANITIZE") == "1":
        asan = OUT / "libkvstore_asan.so"
        if _newer(srcs + hdrs, asan):
            _run("sanitized native library", [cxx, *SANFLAGS, *CXXFLAGS, *INCLUDES, *map(str, srcs), "-o", str(asan)])
    cus = _files(CUDA, "*.cu")
    nvcc = _nvcc()
    cuda_lib = OUT / "libkvstore_cuda.so"
    if nvcc and cus and _newer(cus + CUDA_HOST_UNITS + hdrs + [lib], cuda_lib):
        _run("CUDA library", [nvcc, *NVCCFLAGS, *INCLUDES, *map(str, cus + CUDA_HOST_UNITS), "-o", str(cuda_lib),
                              f"-L{OUT}", "-lkvstore", "-Xlinker", "-rpath,$ORIGIN", "-lcudart"])


# Editable installs and wheel builds alike: the libraries are (re)built when stale, before
# setuptools collects package data.
build_native()

setup(
    packages=["kvstore_native", "kvstore_native.codec"],
    package_data={"kvstore_native": ["_lib/*.so"]},
)
