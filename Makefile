# Two commands do everything from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test test-unit test-integration test-deploy test-browser test-cluster lint \
        typecheck docs schemas bench soak clean interop

# uv installs what pip would, several times faster (parallel downloads, one shared
# cache): 10 s instead of 60 s for the package on a cold machine. pip is the fallback
# when uv cannot be had.
INSTALL = if [ -x $(VENV)/bin/uv ]; then $(VENV)/bin/uv pip install --quiet --python $(PY) $(1); \
          else $(PIP) $(1) 2>&1 | grep -v -i -E 'deprecat|license|^ *!!|^\s*$$|\*{8}|WARNING: Location' || true; fi

# The package alone: what the demo needs (under 30 s).
$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) uv >/dev/null 2>&1 || echo "uv not available: installing with pip"
	$(call INSTALL,-e .)
	touch $@

# Everything the tests, the docs and the benchmarks use (a variable: a comma in $(call)
# would split its argument).
DEV_EXTRAS := .[dev,bench]
$(VENV)/.installed: $(VENV)/.base
	$(call INSTALL,-e '$(DEV_EXTRAS)')
	touch $@

demo: $(VENV)/.base
	$(PY) -m worker demo

# What CI gates on: lint (with the layering rule), types, then unit, integration and deploy.
test: lint typecheck
	$(PY) -m pytest -m "unit or integration or deploy"

test-unit: $(VENV)/.installed
	$(PY) -m pytest -m unit

test-integration: $(VENV)/.installed
	$(PY) -m pytest -m integration

test-deploy: $(VENV)/.installed
	$(PY) -m pytest -m deploy

# The operator page in a real headless Chromium (Debian's `chromium`; CHROMIUM=path to pick
# another); rewrites docs/console.png.
test-browser: $(VENV)/.installed
	$(PY) -m pytest -m browser tests/browser

# Three extra RabbitMQ nodes on this machine (as the rabbitmq user; needs root), killed
# under load: see docs/clusters.md. About 6-8 minutes.
test-cluster: $(VENV)/.installed
	$(PY) -m pytest -m cluster tests/cluster -s -p no:cacheprovider

lint: $(VENV)/.installed
	$(PY) -m ruff check worker tests bench
	$(PY) -m ruff format --check worker tests bench
	$(VENV)/bin/lint-imports

typecheck: $(VENV)/.installed
	$(PY) -m mypy

# The documentation site (mkdocs-material), built with --strict into site/.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

schemas: $(VENV)/.installed
	$(PY) -m worker.messages schemas

bench: $(VENV)/.installed
	$(PY) bench/run.py

soak: $(VENV)/.installed
	$(PY) tests/soak/soak.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site

# LiteLLM's proxy as an upstream (tests/interop): ~750 MB in its own virtualenv, so it is
# neither in the dev extras nor in `make test`.
LITELLM_VENV ?= .venv-litellm
$(LITELLM_VENV)/.installed:
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install --quiet 'litellm[proxy]>=1.50,<2'
	touch $@

interop: $(VENV)/.installed $(LITELLM_VENV)/.installed
	LITELLM_BIN=$(LITELLM_VENV)/bin/litellm $(PY) -m pytest -m interop tests/interop -q
