# Two commands do everything from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-cluster test-browser lint typecheck schemas bench soak clean interop

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m worker demo

test: $(VENV)/.installed
	$(PY) -m ruff check worker tests bench
	$(PY) -m mypy
	$(PY) -m pytest --ignore=tests/browser

# The operator page in a real headless Chromium (Debian's `chromium`; CHROMIUM=path to pick
# another); rewrites docs/console.png.
test-browser: $(VENV)/.installed
	$(PY) -m pytest tests/browser

# Three extra RabbitMQ nodes on this machine (as the rabbitmq user; needs root), killed
# under load: see README "Broker clusters". About 6-8 minutes.
test-cluster: $(VENV)/.installed
	$(PY) -m pytest tests/cluster -m cluster -s -p no:cacheprovider

lint: $(VENV)/.installed
	$(PY) -m ruff check worker tests bench
	$(PY) -m ruff format --check worker tests bench

typecheck: $(VENV)/.installed
	$(PY) -m mypy

schemas: $(VENV)/.installed
	$(PY) -m worker.messages schemas

bench: $(VENV)/.installed
	$(PY) bench/run.py

soak: $(VENV)/.installed
	$(PY) tests/soak/soak.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# LiteLLM's proxy as an upstream (tests/interop): ~750 MB in its own virtualenv, so it is
# neither in the dev extras nor in `make test`.
LITELLM_VENV ?= .venv-litellm
$(LITELLM_VENV)/.installed:
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install --quiet 'litellm[proxy]>=1.50,<2'
	touch $@

interop: $(VENV)/.installed $(LITELLM_VENV)/.installed
	LITELLM_BIN=$(LITELLM_VENV)/bin/litellm $(PY) -m pytest tests/interop -q
