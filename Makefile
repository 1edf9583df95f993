# `make test` and `make env` create .venv from requirements.lock when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: env test demo
env: $(STAMP)

$(STAMP): requirements.lock pyproject.toml tools/setup_env.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash tools/setup_env.sh
	touch $@

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/python tools/demo.py --work-dir work_dirs/demo $(DEMO_ARGS)
