# `make run` and `make test` work on a fresh Linux machine with Python 3.11+ and make:
# both create (or reuse) the virtual environment .venv and install what they need.

PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && echo $$p && break; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck docs pytest soak bench clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "asyncdmabuf needs Python 3.11 or newer" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,docs]'
	touch $@

run: $(STAMP)
	$(BIN)/asyncdmabuf stress

test: lint typecheck docs pytest

# The documentation site, into site/ (gitignored); --strict fails on broken
# links and docstrings mkdocstrings cannot render.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

# The reliability tests of issue 7, at length (many more examples, steps, cycles).
soak: $(STAMP)
	ASYNCDMABUF_SOAK=1 $(BIN)/pytest -p no:cacheprovider --timeout=0 \
		tests/test_stateful.py tests/test_cancel_points.py tests/test_faults.py \
		tests/test_leaks.py tests/test_bad_input.py tests/test_fairness.py tests/test_lock.py

# Every benchmark, one table of ratios; e.g. make bench BENCH_ARGS="--quick --strict".
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/asyncdmabuf bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .mypy_cache .pytest_cache .ruff_cache site
