# Lathe — the two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here (the CPU wheel from the local find-links); pyproject keeps torch>=2.4 (any build).
TORCH_PIN := torch==2.13.0
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links "$(PIP_FIND_LINKS)",)
export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export LYCORIS_KERNEL_BACKEND := torch

.PHONY: install test demo bench clean images e2e

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	$(VENV)/bin/uv pip install --python $(PY) $(FIND_LINKS) "$(TORCH_PIN)"
	$(VENV)/bin/uv pip install --python $(PY) $(FIND_LINKS) "$(TORCH_PIN)" -e ".[trainer,service,dev]"
	touch $@

install: $(VENV)/.installed

# The import contracts first (pyproject.toml [tool.importlinter]: the service's boundary), then the suite.
test: install
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 tests

# Both Dockerfile targets into the local Docker engine (stand-in bases, CPU torch): tests/e2e/images.sh.
images: install
	bash tests/e2e/images.sh

# The service and trainer images run a job chain as Kubernetes would (root, Docker): tests/e2e/e2e.sh.
e2e: images
	bash tests/e2e/e2e.sh

demo: install
	$(PY) -m service.dev.demo

bench: install
	$(PY) bench/train.py --device cpu
	$(PY) bench/shrink.py

clean:
	rm -rf $(VENV) .lathe
