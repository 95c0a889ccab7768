PYTHON ?= python3
export PYTHON

.PHONY: install test bench lint

install:
	bash scripts/install.sh

# The README's test command: install, lint, unit tests, then a smoke run of the benchmark suites.
test: install
	$(PYTHON) -m ruff check moelora kernels bench tests setup.py
	$(PYTHON) -m pytest -q tests
	$(PYTHON) -m pytest -q bench --benchmark-disable -p no:cacheprovider

# The README's main command: the latency comparison of bench/ (small default preset), written to bench/out/
# (gitignored); ARGS="--out bench/results" writes the committed results folder instead.
bench: install
	$(PYTHON) -m bench $(ARGS)

lint: install
	$(PYTHON) -m ruff check moelora kernels bench tests setup.py
	$(PYTHON) -m ruff format --check moelora kernels bench tests
