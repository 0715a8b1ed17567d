#!/usr/bin/env bash
# One call on a lent GPU machine: the GPU tests, then the GPU benchmarks, output under $OUT.
# Carry: .whl (grpcio-tools/-health-checking/-reflection 1.84.0, lmdb, zstandard, pydantic,
# pydantic-core, annotated-types, typing-inspection, redis, hiredis, prometheus-client, uvloop,
# pytest, pytest-timeout, pluggy, iniconfig, packaging, pygments, hypothesis, attrs,
# sortedcontainers) and native/kvstore_native/_lib (built here with nvcc, sm_90).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONPATH=$PWD/wire:$PWD/native:$PWD:$PWD/client:$PWD/testing:$PYTHONPATH PYTHONUNBUFFERED=1
# The protos, generated with that machine's grpcio-tools (its grpcio checks the generator's version).
python3 - <<'PY' || exit 1
from pathlib import Path
src = Path("wire/setup.py").read_text().split("\ngenerate_protos()")[0]
exec(compile(src.replace("Path(__file__)", "Path('wire/setup.py')"), "wire/setup.py", "exec"))
generate_protos()
PY
nvidia-smi -L
python3 -c "import torch, kvstore, kvstore_client; from kvstore_native import cuda_ipc; print(torch.__version__, cuda_ipc.available())" || exit 1
# Real SmolLM2 KV for the codec rows (saved on a CPU machine with kvstore_testing.smollm2.compute_kv,
# carried as .carry/smol_kv_1024.npy); without it KV-like synthetic data.
[ -f .carry/smol_kv_1024.npy ] && export KVSTORE_BENCH_KV_NPY=$PWD/.carry/smol_kv_1024.npy
START=$(date +%s)
timeout ${TESTS_S:-230} python3 -m pytest -q -p no:cacheprovider -o addopts= -rfE tests/gpu tests/codec/test_gpu.py \
  tests/codec/test_gpu_args.py tests/integration/test_gpu_local.py tests/integration/test_local_path.py > "$OUT/tests.log" 2>&1
echo "pytest rc=$? $(( $(date +%s)-START )) s"; tail -25 "$OUT/tests.log"
timeout ${GPU_ALL_S:-240} python3 bench/gpu_all.py --repeats 3 --out "$OUT" > "$OUT/gpu_all.log" 2>&1
echo "gpu_all rc=$? $(( $(date +%s)-START )) s"; tail -60 "$OUT/gpu_all.log"
if [ -n "${GPU_PROFILE:-}" ]; then   # where one store / retrieve call's time goes
  timeout ${GPU_PROFILE_S:-100} python3 bench/gpu_profile.py > "$OUT/profile.txt" 2>&1
  echo "gpu_profile rc=$? $(( $(date +%s)-START )) s"; grep -v "^ *[0-9]" "$OUT/profile.txt" | head -30
fi
[ -n "${SKIP_CODEC_BENCH:-}" ] && exit 0
timeout 80 python3 bench/gpu_codec_bench.py --reps 5 ${KVSTORE_BENCH_KV_NPY:+--kv-npy $KVSTORE_BENCH_KV_NPY} --json "$OUT/codec.json" > "$OUT/codec.log" 2>&1
echo "codec rc=$? $(( $(date +%s)-START )) s"; tail -30 "$OUT/codec.log"
