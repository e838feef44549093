# Two commands set up a fresh machine:
#   make test   create .venv, install through constraints.txt, lint (ruff), run the default (CPU) test tier
#   make run    the main job: the sfa Kubeflow pipeline run locally (kfp.local) on synthetic data,
#               SFA vs the conventional recipe, MLflow in runs/<run-id>/mlflow.db
# and, for the XLA path (CI runs it after `make test`):
#   make test-e2e     the end-to-end runs kept out of `make test` for time: the local pipeline on tiny sizes
#                     and the README's quick starts, run as written (about 3 minutes)
#   make test-images  resolve each Dockerfile's pip installs against their pins (pip --dry-run, no Docker)
#   make test-xla   create .venv-xla with the TPU image's torch/torch-xla pair (constraints-xla.txt, ~7 GB)
#                   and run the tests marked xla on torch-xla's CPU backend with 2 devices
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Constraints apply to build environments too (PIP_CONSTRAINT), so no step pulls an unpinned torch.
PIP    := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install --quiet --progress-bar off
XVENV  ?= .venv-xla
XPY    := $(XVENV)/bin/python
XPIP   := PIP_CONSTRAINT=$(CURDIR)/constraints-xla.txt $(XPY) -m pip install --quiet --progress-bar off --no-cache-dir
# What building .venv-xla needs free, at its peak: the ~8.6 GB environment plus the ~3.5 GB of wheels pip
# holds in its temporary folder until they are installed (measured on this machine's kind).
XLA_NEED_GIB ?= 13
# The smaller free space of the project's folder and pip's temporary folder, in GiB.
FREE_GIB = $$(df -Pk "$(CURDIR)" "$${TMPDIR:-/tmp}" | awk 'NR > 1 { g = int($$4 / 1048576); if (m == "" || g < m) m = g } END { print m }')

# A long quiet command (pip --quiet is silent for minutes) with a line every 20 s, so a slow install does not
# look like a hung one: $(call busy,COMMAND).
busy = @echo "$(1)"; start=$$(date +%s); \
	( while sleep 20 >/dev/null 2>&1; do echo "  ... still installing ($$(( $$(date +%s) - start )) s)"; done ) & beat=$$!; \
	$(1); status=$$?; kill $$beat 2>/dev/null; exit $$status

.PHONY: install install-xla test test-e2e test-images test-xla test-all run clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt constraints-common.txt
	$(PYTHON) -m venv $(VENV)
	$(call busy,$(PIP) -c constraints.txt torch==2.13.0)
	$(call busy,$(PIP) -c constraints.txt -e '.[test]')
	touch $@

# pytest through its entry point, not `python -m pytest`: under runpy every frame of <frozen runpy> misses
# inspect.getmodule's cache, and KFP walks the stack with it for every task it builds (2-4x slower compiles).
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

test-e2e: install
	$(VENV)/bin/pytest -m e2e

test-images: install
	$(VENV)/bin/pytest -m registry

install-xla: $(XVENV)/.installed

$(XVENV)/.installed: pyproject.toml constraints-xla.txt constraints-common.txt
	$(PYTHON) -m venv $(XVENV)
	$(call busy,$(XPIP) -c constraints-xla.txt torch==2.9.0 torch_xla==2.9.0)
	$(call busy,$(XPIP) -c constraints-xla.txt -e '.[test]')
	touch $@

# XLA:CPU with two devices: what SPMD does over a TPU host's chips, on this machine's CPU.
# Where the disk cannot hold .venv-xla the tier is skipped, loudly, rather than failing half-installed
# (a machine of our kind has been seen with under 1 GB free).
test-xla:
	@free=$(FREE_GIB); \
	if [ ! -f $(XVENV)/.installed ] && [ "$$free" -lt $(XLA_NEED_GIB) ]; then \
	  echo "make test-xla: SKIPPED: $$free GiB free where .venv-xla needs about $(XLA_NEED_GIB) GiB" \
	       "(free some space, or set XLA_NEED_GIB to try anyway)"; \
	else \
	  $(MAKE) --no-print-directory install-xla || { rm -rf $(XVENV); exit 1; }; \
	  PJRT_DEVICE=CPU CPU_NUM_DEVICES=2 $(XVENV)/bin/pytest -m xla; \
	fi

test-all: install
	$(VENV)/bin/pytest -m ''

run: install
	$(VENV)/bin/sfa pipeline run

clean:
	rm -rf $(VENV) $(XVENV) build src/*.egg-info .pytest_cache runs
