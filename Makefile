# The two commands a newcomer needs:
#   make dev    set up and run the worker on an embedded PostgreSQL and Kafka-protocol broker
#   make test   set up and run every check: ruff, mypy --strict, the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
# The machine's own PostgreSQL (15 on the CI machine), when there is one: the migration and security
# tests then run on it as well as on the embedded PostgreSQL 18.
SYSTEM_PG_URL ?= $(shell pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && echo postgresql://postgres@127.0.0.1:5432/postgres)

.PHONY: install dev test test-faults test-all lint typecheck pytest clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

dev: install
	$(BIN)/cost-worker dev

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	COST_WORKER_TEST_SYSTEM_DATABASE_URL=$(SYSTEM_PG_URL) $(BIN)/pytest

test: lint typecheck pytest

# The whole fault suite, slow scenarios included (about ten minutes on 2 cores); writes the figures of the
# run to tests/faults/RESULTS.md. `make test` runs only its quick part (slow scenarios are deselected).
test-faults: install
	COST_WORKER_FAULT_RESULTS=tests/faults/RESULTS.md $(BIN)/pytest tests/faults -m "" -v

# Everything: lint, types, the default suite and the slow scenarios.
test-all: lint typecheck
	COST_WORKER_TEST_SYSTEM_DATABASE_URL=$(SYSTEM_PG_URL) COST_WORKER_FAULT_RESULTS=tests/faults/RESULTS.md \
		$(BIN)/pytest -m ""

clean:
	rm -rf $(VENV) .dev .mypy_cache .ruff_cache .pytest_cache .hypothesis
