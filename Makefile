# Two commands set up a fresh machine: `make serve` and `make test`. Both create .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# This machine carries the CPU build of torch as a local wheel; pip must take it, never a CUDA build.
WHEELS := $(wildcard /opt/wheels)
PIP_FLAGS := $(if $(WHEELS),--find-links $(WHEELS),)
TORCH := torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test bench lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Reinstalls when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q $(PIP_FLAGS) $(TORCH)
	$(PIP) install -q $(PIP_FLAGS) -e '.[node,optimize,dev]'
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(BIN)/edgegen models pull digits
	$(BIN)/edgegen serve --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/predict.py

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: setup
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
