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
# llama-cpp-python ships as source only: pip compiles llama.cpp (minutes). We build the wheel once per
# CPU feature set into our own cache, because pip's wheel cache would hand back a wheel built with other
# flags. GGML_NATIVE is off on purpose: -march=native turns on llama.cpp's AMX kernels on CPUs that
# advertise AMX, and those crash (SIGSEGV in ggml_backend_amx_mul_mat) on this machine's VMs.
LLAMA := llama-cpp-python==0.3.36
LLAMA_FLAGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_FLAGS += $(if $(shell grep -m1 -w avx512f /proc/cpuinfo),-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON,)
LLAMA_FLAGS += $(if $(shell grep -m1 -w avx_vnni /proc/cpuinfo),-DGGML_AVX_VNNI=ON,)
LLAMA_WHEELS := $(HOME)/.cache/edgegen/wheels/$(shell echo '$(LLAMA) $(LLAMA_FLAGS)' | md5sum | cut -c1-12)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test image bench bench-optimize audit lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(LLAMA_WHEELS)/.built: | $(BIN)/python
	mkdir -p $(LLAMA_WHEELS)
	CMAKE_ARGS="$(LLAMA_FLAGS)" $(PIP) wheel -q --no-deps --no-cache-dir $(LLAMA) -w $(LLAMA_WHEELS)
	touch $@

# What a node runs, and nothing else: the node extra and the llama.cpp wheel (no torch, test tools or
# browser; the default models are built and fetched with these alone). Reinstalls when pyproject.toml changes.
$(VENV)/.node: pyproject.toml $(LLAMA_WHEELS)/.built | $(BIN)/python
	$(PIP) install -q --find-links $(LLAMA_WHEELS) -e '.[node]'
	touch $@

# Everything the tests, the benchmarks and the optimization stack need. Reinstalls when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml $(LLAMA_WHEELS)/.built | $(BIN)/python
	$(PIP) install -q $(PIP_FLAGS) $(TORCH)
	$(PIP) install -q $(PIP_FLAGS) --find-links $(LLAMA_WHEELS) -e '.[node,optimize,dev]'
	touch $@

# The job queue's Redis backend is tested against a real redis-server (Debian's package).
/usr/bin/redis-server:
	command -v apt-get >/dev/null || { echo "install redis-server (7.x) for the jobs tests"; exit 1; }
	apt-get install -y -qq redis-server || { apt-get update -qq && apt-get install -y -qq redis-server; }

# The dashboard is tested in a real headless browser: Debian's chromium, driven by Playwright (no download).
/usr/bin/chromium:
	command -v apt-get >/dev/null || { echo "install chromium for the dashboard test"; exit 1; }
	apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }

# deploy/prometheus/ is checked by promtool and run by a real Prometheus scraping a fleet (Debian's, 2.42).
/usr/bin/prometheus:
	command -v apt-get >/dev/null || { echo "install prometheus (2.x, with promtool) for its tests"; exit 1; }
	apt-get install -y -qq prometheus || { apt-get update -qq && apt-get install -y -qq prometheus; }

setup: $(VENV)/.installed /usr/bin/redis-server /usr/bin/chromium /usr/bin/prometheus

serve: $(VENV)/.node
	$(BIN)/edgegen models pull digits
	$(BIN)/edgegen models pull smollm2-135m
	$(BIN)/edgegen serve --host $(HOST) --port $(PORT)

test: lint
	$(BIN)/python -m pytest

# The container image (docs/operations.md, "Containers"): podman builds deploy/docker/Dockerfile from the
# llama.cpp wheel built above; the base is made locally with debootstrap (as root) the first time.
PODMAN_PKGS := podman buildah runc debootstrap podman-compose
image: $(LLAMA_WHEELS)/.built
	command -v podman >/dev/null || apt-get install -y -qq $(PODMAN_PKGS) || { apt-get update -qq && apt-get install -y -qq $(PODMAN_PKGS); }
	deploy/podman/image.sh $(LLAMA_WHEELS)

bench: setup
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/triton_clients.py
	$(BIN)/python bench/llm.py
	$(BIN)/python bench/streams.py
	$(BIN)/python bench/structured.py
	$(BIN)/python bench/speculative.py
	$(BIN)/python bench/idle_cells.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/relay_parts.py
	$(BIN)/python bench/fleet_loops.py
	$(BIN)/python bench/tracing.py
	$(BIN)/python bench/security.py
	$(BIN)/python bench/jobs.py
	$(BIN)/python bench/cache.py
	$(BIN)/python bench/workers.py
	$(BIN)/python bench/operations.py

# Static analysis of our code (bandit: any finding fails) and known vulnerabilities of the installed
# dependencies (pip-audit: says plainly when its service cannot be reached). Not part of `make test`.
audit: setup
	$(BIN)/bandit -q -c pyproject.toml -r src
	$(BIN)/python scripts/audit_deps.py

# Both example recipes end to end (about 6 minutes here), targets checked: see bench/optimize.py.
bench-optimize: setup
	$(BIN)/python bench/optimize.py

# Style, format, the layer contract and the types (pyproject.toml; docs/architecture.md): `make test`
# runs it first.
lint: setup
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/lint-imports
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format src tests bench scripts
	$(BIN)/ruff check --fix src tests bench scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
