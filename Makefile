# The two commands: `make test` and `make demo`. Both build .venv from pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench stress clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider

demo: $(STAMP)
	$(BIN)/python -m pipeproc demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks

stress: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -p no:cacheprovider --timeout 1200

clean:
	rm -rf $(VENV) pipeproc_data build *.egg-info
