# Signalbox developer tasks. Every variable below can be overridden on the command line or from
# the environment, e.g. `make test PYTEST_ARGS="-k advance -x"` or `make worker POOLS=pool.research`.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# Rebuilt whenever pyproject.toml changes, so `make install` is a no-op when nothing changed.
STAMP := $(VENV)/.installed

# Production mode on local services. Targets that need them (test, bench, web, worker, beat,
# migrate) pass these to their command; `demo` does not, because it runs embedded.
DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/signalbox
REDIS_URL ?= redis://127.0.0.1:6379/0
# The test suite empties its Redis database at start: never the one a dev worker uses.
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15
API_TEST_REDIS_URL ?= redis://127.0.0.1:6379/13
E2E_TEST_REDIS_URL ?= redis://127.0.0.1:6379/12
SCHEMATHESIS_TESTS := tests/api/test_schemathesis.py
# Not a secret: only ever used by the test suite.
TEST_SECRET_KEY ?= signalbox-test-suite-key-not-a-secret-0123456789abcdefghij

POOLS ?= pool.default,pool.research
WORKER_CONCURRENCY ?= 2
WEB_ADDR ?= 127.0.0.1:8000
LOG_LEVEL ?= info
PYTEST_ARGS ?=
BENCH_ARGS ?=
DEMO_ARGS ?=

SERVICES_ENV = DATABASE_URL='$(DATABASE_URL)' REDIS_URL='$(REDIS_URL)'
TEST_ENV = DATABASE_URL='$(DATABASE_URL)' REDIS_URL='$(TEST_REDIS_URL)' SECRET_KEY='$(TEST_SECRET_KEY)' SIGNALBOX_ENV=test

.PHONY: help install demo test lint fmt typecheck bench bench-policy bench-inprocess web worker beat migrate clean distclean

help:
	@echo "make install    virtualenv in $(VENV) with the project and its dev tools"
	@echo "make demo       everything in one process, no services (SQLite, in-process broker)"
	@echo "make test       migration check + pytest against PostgreSQL and Redis"
	@echo "make lint       ruff check + ruff format --check"
	@echo "make fmt        ruff fix + format"
	@echo "make typecheck  mypy (django-stubs)"
	@echo "make bench      reference workload benchmark (PostgreSQL, Redis, real workers)"
	@echo "make bench-policy  the demo policy's cost against none, in interleaved pairs (issue 18)"
	@echo "make bench-inprocess  the same in one process: the Python a policy adds per run"
	@echo "make migrate    apply migrations to DATABASE_URL"
	@echo "make web        development ASGI server on $(WEB_ADDR)"
	@echo "make worker     Celery worker for POOLS=$(POOLS)"
	@echo "make beat       Celery beat (engine tick, reaper, timers)"
	@echo "make clean      caches and build output (keeps $(VENV) and var/; distclean drops $(VENV))"

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

demo: install
	$(PY) manage.py demo $(DEMO_ARGS)

test: install
	$(TEST_ENV) $(PY) manage.py makemigrations --check --dry-run
	$(BIN)/ruff check --quiet .
	$(BIN)/lint-imports --no-cache
	$(TEST_ENV) $(BIN)/mypy
	# The schemathesis run (CPU-bound, 2 to 5 minutes), then the browser tests, go beside the rest
	# of the suite (mostly waiting on real workers), each on a test database and a Redis database
	# of its own. Browser tests run in a pytest process of their own: sync Playwright breaks
	# asyncio tests that follow it in the same process.
	@mkdir -p var; \
	( $(TEST_ENV) REDIS_URL='$(API_TEST_REDIS_URL)' DATABASE_TEST_NAME=test_signalbox_schemathesis \
	    $(BIN)/pytest -m "not e2e" $(SCHEMATHESIS_TESTS) $(PYTEST_ARGS) > var/schemathesis.log 2>&1; \
	  api=$$?; \
	  $(TEST_ENV) REDIS_URL='$(E2E_TEST_REDIS_URL)' DATABASE_TEST_NAME=test_signalbox_e2e \
	    $(BIN)/pytest -m e2e $(PYTEST_ARGS) > var/e2e.log 2>&1; \
	  e2e=$$?; [ $$e2e -eq 5 ] && e2e=0; \
	  [ $$api -eq 0 ] && [ $$e2e -eq 0 ] ) & side=$$!; \
	$(TEST_ENV) $(BIN)/pytest -m "not e2e" --ignore=$(SCHEMATHESIS_TESTS) $(PYTEST_ARGS); rest=$$?; \
	wait $$side; sides=$$?; \
	echo "---- $(SCHEMATHESIS_TESTS) ----"; cat var/schemathesis.log; \
	echo "---- browser tests (-m e2e) ----"; cat var/e2e.log; \
	[ $$rest -eq 0 ] && [ $$sides -eq 0 ]

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy

bench: install
	$(TEST_ENV) $(PY) -m tests.bench.run $(BENCH_ARGS)

bench-policy: install
	$(TEST_ENV) $(PY) -m tests.bench.policy_pairs $(BENCH_ARGS)

bench-inprocess: install
	$(TEST_ENV) $(PY) -m tests.bench.inprocess $(BENCH_ARGS)

migrate: install
	$(SERVICES_ENV) $(PY) manage.py migrate

web: install
	$(SERVICES_ENV) $(PY) manage.py runserver $(WEB_ADDR)

worker: install
	$(SERVICES_ENV) $(BIN)/celery -A console worker -Q $(POOLS) \
		--concurrency $(WORKER_CONCURRENCY) --prefetch-multiplier 1 -l $(LOG_LEVEL)

beat: install
	mkdir -p var
	$(SERVICES_ENV) $(BIN)/celery -A console beat --schedule var/celerybeat-schedule -l $(LOG_LEVEL)

clean:
	rm -rf .pytest_cache .ruff_cache .mypy_cache staticfiles build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
