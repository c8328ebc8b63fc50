# `make demo` and `make test` set everything up on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export READMISSION_HOME ?= $(CURDIR)/.readmission

.PHONY: install demo ui mlflow-ui serve app observe status test contract e2e chaos observability rollout browser profile bench loadtest clean

# constraints.txt pins every package of a known-good resolution, so a fresh install resolves the same versions.
$(BIN)/readmission: pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable ".[test,bench,k8s]"
	touch $@

install: $(BIN)/readmission

demo: install
	$(BIN)/readmission demo

ui: install
	$(BIN)/readmission ui

mlflow-ui: install
	$(BIN)/readmission mlflow-ui

serve: install
	$(BIN)/readmission serve

app: install
	$(BIN)/readmission app

observe: install
	$(BIN)/readmission observe

status: install
	$(BIN)/readmission status

# Three workers on two cores: much of a test's time is a server starting or a run launching, not CPU. A file's tests
# stay on one worker (--dist loadfile), so a module's served model or store is built once.
TEST_WORKERS ?= 3

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# Schemathesis over every route of the served API at full depth; `make test` runs the same check with fewer examples.
contract: install
	$(BIN)/python -m pytest -m contract

# The headless demo end to end (`readmission demo` on two batches under a real daemon, sensors and bentoml serve); the
# longest test by far, so not in `make test`, which keeps a small-data end-to-end train (defs/test_training.py).
e2e: install
	$(BIN)/python -m pytest -m e2e

# kill -9 of run workers, the daemon and its code server under a real daemon; a few minutes, so not in `make test`.
chaos: install
	$(BIN)/python -m pytest -m chaos

# A real Prometheus and Alertmanager on a real bentoml serve, alerts to a webhook; a few minutes, so not in `make test`.
observability: install
	$(BIN)/python -m pytest -m observability

# Shadow and canary candidates (good, raising, slow, not loading) in a real bentoml serve; minutes, so not in `make test`.
rollout: install
	$(BIN)/python -m pytest -m rollout

# The app in headless Chromium (Debian's /usr/bin/chromium) on a real bentoml serve; its screenshot in test-artifacts/.
browser: install
	$(BIN)/python -m pytest -m browser

# The production profile (deploy/): PostgreSQL, the tracking server, the code server, webserver, daemon and two service
# replicas, each its own process and folder on loopback; batches ingested four at a time, a promotion followed, a
# replica killed under load. Several minutes, so not in `make test`.
profile: install
	$(BIN)/python -m pytest -m profile

bench: install
	$(BIN)/python benchmarks/bench_ingest.py
	$(BIN)/python benchmarks/bench_training.py
	$(BIN)/python benchmarks/bench_drift.py
	$(BIN)/python benchmarks/bench_serving.py
	$(BIN)/python benchmarks/bench_live.py
	$(BIN)/python benchmarks/loadtest.py
	$(BIN)/python benchmarks/loadtest.py --rollout
	$(BIN)/python benchmarks/bench_deploy.py

loadtest: install
	$(BIN)/python benchmarks/loadtest.py

clean:
	rm -rf $(READMISSION_HOME)
