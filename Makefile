# The two commands: `make test` and `make demo`. Both build .venv from pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint demo bench bench-peers bench-compare stress clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

test: lint
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider

# type check (configuration in pyproject.toml [tool.mypy]); part of `make test`
lint: $(STAMP)
	$(BIN)/python -m mypy

demo: $(STAMP)
	$(BIN)/python -m pipeproc demo
	$(BIN)/python -m pipeproc demo --flow

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# the same workloads against a local redis-server, when there is one (skipped otherwise)
bench-peers: $(STAMP)
	$(BIN)/python -m benchmarks.peers.redis_streams

# both suites from one command, alternated, and one side-by-side table with the ratio
# pipeproc / Redis at equal durability (the Redis side is skipped without a redis-server)
bench-compare: $(STAMP)
	$(BIN)/python -m benchmarks.compare $(COMPARE_ARGS)

stress: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -p no:cacheprovider --timeout 1200

clean:
	rm -rf $(VENV) pipeproc_data build *.egg-info
