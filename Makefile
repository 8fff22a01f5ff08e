# The README's two commands. Each creates .venv and installs everything first.
VENV ?= .venv
PY := $(VENV)/bin/python
# torchvision (for the real-model tests) needs this pair; both install from the local disk here.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install demo test lint

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,mpi,examples]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/quick_check.py

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest
