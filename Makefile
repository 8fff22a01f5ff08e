# The README's two commands (and the documentation site: make docs). Each creates .venv and installs everything first.
VENV ?= .venv
PY := $(VENV)/bin/python
# torchvision (for the real-model tests) needs this pair; both install from the local disk here.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# Ranks of the demo: 4 CPU processes on Gloo without GPU (4 images each), one per GPU with one.
NPROC ?= 4

.PHONY: install demo test lint docs docs-serve bench

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,mpi,examples,docs]"
	touch $(STAMP)

install: $(STAMP)

# Local BatchNorm vs syncnorm vs one process on scikit-learn's digits: a table, and out/train_digits.png.
demo: install
	PYTHON=$(PY) launch/torchrun.sh --nproc $(NPROC) examples/train_digits.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml, docs/) into site/, warnings as errors: a broken link or anchor, a page
# missing from the nav, a docstring that does not render fails it. NO_MKDOCS_2_WARNING: Material's banner.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The same site served at http://127.0.0.1:8000, rebuilt on every save.
docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

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
