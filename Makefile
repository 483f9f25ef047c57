# The two commands: `make demo` runs the local stack with a demo request, `make test` runs the tests.
PYTHON := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-soak test-rest lint install lock services slurm-up slurm-down bench model-check

.venv/.installed: pyproject.toml requirements.lock scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	touch $@

install: .venv/.installed

# Upgrades every locked package to the newest version pyproject.toml allows, reinstalls and runs
# the tests. `make lock UPGRADE=` only re-resolves (after editing pyproject.toml), keeping pins.
UPGRADE ?= --upgrade
lock: install
	.venv/bin/uv pip compile pyproject.toml --extra test --extra dev --generate-hashes \
		--python-version 3.11 --custom-compile-command 'make lock' $(UPGRADE) -o requirements.lock
	bash scripts/bootstrap.sh
	touch .venv/.installed
	$(MAKE) test

# Static checks: lint, types (mypy loads emg.settings, which needs no database, and in debug mode no
# secret key), import contracts.
# Formatting (`ruff format --check`) is configured but not enforced yet: the code was never reformatted.
lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	DJANGO_DEBUG=1 DATABASE_URL=sqlite://:memory: .venv/bin/mypy
	.venv/bin/lint-imports

services:
	bash scripts/ensure-services.sh

slurm-up: services
	bash scripts/slurm-up.sh

slurm-down:
	bash scripts/slurm-down.sh

# spin checks the ClusterJob submission protocol's model (docs/protocol/README.md); the test suite
# runs the same checks (tests/test_submission_model.py), so `make test` needs no separate step.
model-check:
	bash scripts/model-check.sh
	bash scripts/model-check.sh --planted

test: install slurm-up
	DJANGO_DEBUG=1 DJANGO_SETTINGS_MODULE=emg.settings DATABASE_URL=sqlite://:memory: $(PYTHON) manage.py makemigrations --check --dry-run
	$(PYTHON) -m pytest -m "not soak" $(PYTEST_ARGS)

# The longer repeats (pytest marker `soak`), kept out of `make test` so CI stays within its time.
test-soak: install slurm-up
	$(PYTHON) -m pytest -m soak $(PYTEST_ARGS)

# The stack's e2e tests on the slurmrestd backend (every Slurm command on the stack's PATH a
# stand-in that fails): `make test` runs them on Slurm's commands, and the adapter tests on both.
test-rest: install slurm-up
	EMG_TEST_CLUSTER_BACKEND=slurmrestd $(PYTHON) -m pytest -m "not soak" tests/e2e/test_walking_skeleton.py $(PYTEST_ARGS)

demo: install services
	$(PYTHON) -m devstack.demo

bench: install slurm-up
	$(PYTHON) bench/run_all.py
