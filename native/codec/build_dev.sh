#!/usr/bin/env bash
# Development build of the codec libraries with the flags of the project's setup.py:
#   kvstore/_native/libkvstore.so       g++ -O3 -std=c++17 -fPIC -shared  (native/**/*.cpp)
#   kvstore/_native/libkvstore_cuda.so  nvcc (native/**/*.cu), only when nvcc is present
# SANITIZE=1 builds kvstore/_native/libkvstore_asan.so with -fsanitize=address,undefined.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="$root/kvstore/_native"
mkdir -p "$out"
mapfile -t cpp < <(find "$root/native" -name '*.cpp' | sort)
if [[ "${SANITIZE:-0}" == 1 ]]; then
  g++ -O1 -g -std=c++17 -fPIC -shared -fsanitize=address,undefined -fno-omit-frame-pointer \
    "${cpp[@]}" -o "$out/libkvstore_asan.so" -lpthread
  echo "built $out/libkvstore_asan.so"
  exit 0
fi
g++ -O3 -std=c++17 -fPIC -shared "${cpp[@]}" -o "$out/libkvstore.so" -lpthread
echo "built $out/libkvstore.so"
NVCC="${NVCC:-$(command -v nvcc || true)}"
[[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
mapfile -t cu < <(find "$root/native" -name '*.cu' | sort)
if [[ -n "$NVCC" && ${#cu[@]} -gt 0 ]]; then
  "$NVCC" -O3 -std=c++17 -Xcompiler -fPIC -shared -gencode=arch=compute_90,code=sm_90 \
    -I"$root/native/codec" "${cu[@]}" -o "$out/libkvstore_cuda.so" -lcudart
  echo "built $out/libkvstore_cuda.so"
fi
