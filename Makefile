# Two commands set up a fresh machine:
#   make test   create .venv, install through constraints.txt, lint (ruff), run the default (CPU) test tier
#   make run    the main job: the sfa Kubeflow pipeline run locally (kfp.local) on synthetic data,
#               SFA vs the conventional recipe, MLflow in runs/<run-id>/mlflow.db
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Constraints apply to build environments too (PIP_CONSTRAINT), so no step pulls an unpinned torch.
PIP    := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install --quiet --progress-bar off

.PHONY: install test test-all run clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -c constraints.txt torch==2.13.0
	$(PIP) -c constraints.txt -e '.[test]'
	touch $@

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-all: install
	$(PY) -m pytest -m ''

run: install
	$(VENV)/bin/sfa pipeline run

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache runs
