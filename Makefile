# `make test` and `make env` create .venv from requirements.lock when it is missing or stale;
# `make test` also creates .venv-core, the torch-only environment of the core tests.
PYTHON ?= python3
VENV ?= .venv
CORE_VENV ?= .venv-core
STAMP := $(VENV)/.installed
CORE_STAMP := $(CORE_VENV)/.installed
CORE_SOURCES := $(shell find plugin/robustbn -maxdepth 2 -name '*.py' -not -path '*/openmmlab/*')

.PHONY: env core-env lint test-core test demo
env: $(STAMP)
core-env: $(CORE_STAMP)

$(STAMP): requirements.lock pyproject.toml tools/setup_env.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash tools/setup_env.sh
	touch $@

# robustbn is installed as a copy there: reinstalled when a core source changes.
$(CORE_STAMP): requirements.lock pyproject.toml tools/setup_core_env.sh $(CORE_SOURCES)
	PYTHON=$(PYTHON) VENV=$(CORE_VENV) bash tools/setup_core_env.sh
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test-core: $(CORE_STAMP)
	$(CORE_VENV)/bin/python -m pytest -q tests/core

test: lint test-core
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/python tools/demo.py --work-dir work_dirs/demo $(DEMO_ARGS)
