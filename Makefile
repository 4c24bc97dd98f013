# `make demo` and `make test` work on a fresh machine: they create .venv, install the package and its
# test dependencies, and install Debian's Fashion-MNIST when it is missing. Both are idempotent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup data benchmark

demo: setup data
	$(VENV)/bin/d3-plugin demo

test: setup data
	$(PY) -m pytest -q

benchmark: setup data
	$(PY) benchmarks/throughput.py

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

data:
	@[ -f $(FMNIST) ] || [ -n "$$D3_FASHION_MNIST" ] || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)
