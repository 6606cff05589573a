# Every target sets up .venv itself (python3 -m venv + pip install -e '.[dev]').
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PROTO  := protos/gradshard/v1/gradshard.proto

.PHONY: setup demo test bench protos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Train a 1,004,890-parameter MLP on synthetic data over a local embedded Ray, through gRPC.
demo: $(STAMP)
	$(VENV)/bin/gradshard demo

test: $(STAMP)
	$(PY) -m pytest

# Service vs in-process numpy on the workloads of bench/, three runs and the verdict on the
# targets; writes bench/RESULTS.md (7.5-8 minutes on the 2-core machine of bench/RESULTS.md).
bench: $(STAMP)
	$(VENV)/bin/gradshard bench --runs 3 --write bench/RESULTS.md

# Regenerate the committed stubs (tests/test_protos.py fails when they drift).
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos $(PROTO)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
