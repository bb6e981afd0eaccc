# `make demo` and `make test` each work on a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test test-fast data install clean docs

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q 'setuptools>=68' wheel
	$(BIN)/pip install -q -e '.[dev,launchers,docs,tensorboard,mlflow,timm]'
	touch $(INSTALLED)

# Fashion-MNIST, offline, from Debian's package (the tests and the demo use it).
data: $(FASHION)

$(FASHION):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; \
	fi

# one worker per core (at most 4), each on one thread (tests/conftest.py)
test: $(INSTALLED) data
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4

# The fast tier: everything but the end-to-end and subprocess runs marked slow (docs/testing.md).
test-fast: $(INSTALLED) data
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 -m "not slow"

demo: $(INSTALLED) data
	$(BIN)/kdrun pipeline experiment=demo

# The documentation site, into site/; a broken link or a page missing from nav fails it.
docs: $(INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build dist site *.egg-info
