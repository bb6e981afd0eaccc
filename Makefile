# `make demo` and `make test` each work on a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test data install clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q 'setuptools>=68' wheel
	$(BIN)/pip install -q -e '.[dev,launchers]'
	touch $(INSTALLED)

# Fashion-MNIST, offline, from Debian's package (the tests and the demo use it).
data: $(FASHION)

$(FASHION):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; \
	fi

test: $(INSTALLED) data
	$(BIN)/python -m pytest -q

demo: $(INSTALLED) data
	$(BIN)/kdrun pipeline experiment=demo

clean:
	rm -rf $(VENV) build dist *.egg-info
