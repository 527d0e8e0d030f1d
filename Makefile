# The two commands of the quick start: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
SAMPLE := sample-data
PORT   ?= 7070
# Only torch's CPU build: small enough for the tests and the benchmark peers.
TORCH  := torch==2.13.0+cpu

.PHONY: run test lint typecheck unit bench clean sample

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet -e '.[sample]'
	touch $@

# System packages first: the FUSE binding (extra "fuse") builds against libfuse3. Where libfuse3
# is missing it is left out, and the FUSE tests say so (under CI they fail).
$(VENV)/.dev-installed: pyproject.toml scripts/install-test-deps.sh | $(VENV)/bin/python
	bash scripts/install-test-deps.sh
	if pkg-config --exists fuse3 2>/dev/null; then \
		$(PIP) install --quiet -e '.[dev,fuse]'; \
	else \
		echo "make: libfuse3 not found: installing without the FUSE binding" >&2; \
		$(PIP) install --quiet -e '.[dev]'; \
	fi
	$(PIP) install --quiet '$(TORCH)' || \
		echo "make: no CPU build of torch in the package index: its FUSE test is skipped" >&2
	touch $@ $(VENV)/.run-installed

$(SAMPLE)/README.json: scripts/make_sample.py | $(VENV)/.run-installed
	$(PY) scripts/make_sample.py $(SAMPLE)

sample: $(SAMPLE)/README.json

## make run: install, build a small sample dataset, start an embedded node on it
run: $(VENV)/.run-installed $(SAMPLE)/README.json
	$(VENV)/bin/depot up --ufs $(SAMPLE) --port $(PORT)

## make test: install what the tests need, then lint, type-check and run the whole suite
test: $(VENV)/.dev-installed
	bash scripts/install-test-deps.sh
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -p no:cacheprovider

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts || true

typecheck: $(VENV)/.dev-installed
	$(VENV)/bin/mypy

unit: $(VENV)/.dev-installed
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/unit

# The benchmark suite's peers: Run:ai Model Streamer needs torch (installed with the test
# dependencies: the FUSE tests load a checkpoint with torch.load(mmap=True)); without a CPU build
# of torch in the index the suite reports that peer as missing.
# nginx: a C server, the second ceiling of the S3 bench's client (installed when root).
$(VENV)/.bench-installed: pyproject.toml | $(VENV)/.dev-installed
	if ! command -v nginx >/dev/null && ! [ -x /usr/sbin/nginx ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
				nginx-light || echo "make: nginx not installed: no nginx row" >&2; \
		else \
			echo "make: nginx not found (needs root to install): no nginx row" >&2; \
		fi; \
	fi
	if $(PY) -c 'import torch' 2>/dev/null || $(PIP) install --quiet '$(TORCH)'; then \
		$(PIP) install --quiet -e '.[bench]'; \
	else \
		echo "make: no CPU build of torch in the package index: no Run:ai peer" >&2; \
	fi
	touch $@

## make bench: the performance suite (python -m bench all; SIZE=1GiB by default)
SIZE ?= 1GiB
bench: $(VENV)/.bench-installed
	$(PY) -m bench all --size $(SIZE)

clean:
	rm -rf $(VENV) $(SAMPLE) .depot .pytest_cache .mypy_cache .ruff_cache
