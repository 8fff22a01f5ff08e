# The README's two commands (and the documentation site: make docs). Each installs what it needs first:
# into a new .venv, or into PYTHON=/path/to/python (else an active virtual environment, VIRTUAL_ENV) when given.
# A torch >= 2.13 that interpreter already has is kept: pip is held to its version, so no second torch comes.
VENV ?= .venv
ifdef PYTHON
PY := $(PYTHON)
else ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
endif
ifdef PY
# One folder of stamps per interpreter (not inside its environment, which may not be writable).
STAMPS := build/make/$(subst /,_,$(PY))
else
PY := $(VENV)/bin/python
STAMPS := $(VENV)
OWN_VENV := 1
endif
# The tests' torch: torchvision (for the real-model tests) needs this pair; both install from the local disk here.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# The demo's torch, where the interpreter has none: with a GPU (nvidia-smi lists one) the CUDA build, else a CPU
# build, which this package index offers for 2.13.0 (elsewhere, e.g.: CPU_TORCH="torch --index-url
# https://download.pytorch.org/whl/cpu").
GPU_TORCH ?= torch==2.14.1
CPU_TORCH ?= torch==2.13.0
# make demo's ranks: NPROC=N processes; CPU=1 ignores the GPUs (Gloo). Default: one per GPU, else 4 CPU processes.
NPROC ?=
CPU ?=
# DRY_RUN=1: print the demo's launch command (the launcher's --dry-run) and install nothing.
DRY_RUN ?=
LAUNCHER ?= launch/torchrun.sh
TEST_EXTRAS := test,mpi,examples,docs

.PHONY: install demo test lint docs docs-serve bench

# $(1): the stamp; $(2): the torch to install where the interpreter has none; $(3): the extras. The interpreter's
# torch version (its distribution's: a CUDA build's torch.__version__ has a +cuXXX that pip would not find)
# goes into a pip constraint file beside the stamp.
define install_into
	@mkdir -p $(dir $(1))
	@have=$$($(PY) -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true); \
	if [ -z "$$have" ]; then \
	    echo "$(PY) -m pip install $(2)"; $(PY) -m pip install -q $(2) || exit 1; \
	    have=$$($(PY) -c 'import importlib.metadata as m; print(m.version("torch"))'); \
	fi; \
	$(PY) -c 'import sys; v = "'$$have'".split("+")[0].split("."); sys.exit(0 if (int(v[0]), int(v[1])) >= (2, 13) \
	    else "syncnorm needs torch >= 2.13, and $(PY) has '$$have': upgrade it, or leave PYTHON and VIRTUAL_ENV unset \
	    for a new .venv")' || exit 1; \
	echo "torch==$$have" > $(1).torch; \
	echo "$(PY) -m pip install -e '.[$(3)]'   (keeping torch $$have)"; \
	$(PY) -m pip install -q -c $(1).torch -e ".[$(3)]"
	@touch $(1)
endef

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMPS)/.demo-installed: pyproject.toml Makefile $(if $(OWN_VENV),$(VENV)/bin/python)
	$(call install_into,$@,$(if $(shell nvidia-smi -L 2>/dev/null),$(GPU_TORCH),$(CPU_TORCH)),examples)

# In .venv the tests' torch replaces the demo's (a CPU build, an older release).
$(STAMPS)/.installed: pyproject.toml Makefile $(if $(OWN_VENV),$(VENV)/bin/python)
	$(if $(OWN_VENV),$(PY) -m pip install -q $(TORCH))
	$(call install_into,$@,$(TORCH),$(TEST_EXTRAS))

install: $(STAMPS)/.installed

# Local BatchNorm vs syncnorm vs one process on scikit-learn's digits: a table, and out/train_digits.png. The
# launcher counts the GPUs (one rank each); without GPU (nvidia-smi lists none) or with CPU=1, 4 CPU ranks.
demo: $(if $(DRY_RUN),,$(STAMPS)/.demo-installed)
	@flags="$(if $(filter-out 0,$(CPU)), --cpu)$(if $(DRY_RUN), --dry-run)"; \
	if [ -n "$(NPROC)" ]; then flags="$$flags --nproc $(NPROC)"; \
	elif [ -n "$(filter-out 0,$(CPU))" ] || ! nvidia-smi -L >/dev/null 2>&1; then flags="$$flags --nproc 4"; fi; \
	echo "PYTHON=$(PY) $(LAUNCHER)$$flags examples/train_digits.py"; \
	PYTHON=$(PY) $(LAUNCHER)$$flags examples/train_digits.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy

# The documentation site (mkdocs.yml, docs/) into site/, warnings as errors: a broken link or anchor, a page
# missing from the nav, a docstring that does not render fails it. NO_MKDOCS_2_WARNING: Material's banner.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# The same site served at http://127.0.0.1:8000, rebuilt on every save.
docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

# pytest (single-process, spawned Gloo ranks, the launchers), then the MPI lane on 2 and on 3 ranks:
# mpirun --allow-run-as-root --oversubscribe -n N python -m pytest --with-mpi tests/mpi, under a timeout,
# failing unless every rank ran and passed tests.
test: lint docs
	$(PY) -m pytest
	PYTHON=$(PY) tests/mpi/run.sh 2
	PYTHON=$(PY) tests/mpi/run.sh 3

# CPU benchmarks (tables, never assertions): the layer at three shapes on 2 and 4 Gloo ranks, and a model step.
bench: install
	PYTHONPATH=. $(PY) benchmarks/bench_cpu.py
	PYTHONPATH=. $(PY) benchmarks/bench_model.py
