# The two commands: `make demo` runs the local stack with a demo request, `make test` runs the tests.
PYTHON := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: demo test install services slurm-up slurm-down bench model-check

.venv/.installed: pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	touch $@

install: .venv/.installed

services:
	bash scripts/ensure-services.sh

slurm-up: services
	bash scripts/slurm-up.sh

slurm-down:
	bash scripts/slurm-down.sh

# spin checks the ClusterJob submission protocol's model (docs/protocol/README.md).
model-check:
	bash scripts/model-check.sh
	bash scripts/model-check.sh --planted

test: install slurm-up model-check
	DJANGO_SETTINGS_MODULE=emg.settings DATABASE_URL=sqlite://:memory: $(PYTHON) manage.py makemigrations --check --dry-run
	$(PYTHON) -m pytest $(PYTEST_ARGS)

demo: install services
	$(PYTHON) manage.py demo

bench: install slurm-up
	$(PYTHON) bench/run_all.py
