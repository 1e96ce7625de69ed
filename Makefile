# Set-up, tests and the main job. Every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test run benchmark clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

test: setup
	$(PY) -m pytest -q tests

run: setup
	@echo "The MONAI Label app (apps/delightsam) is not built yet: it is issue #3. The library is ready: see README.md." >&2
	@exit 1

benchmark: setup
	$(PY) scripts/benchmark_forward.py

clean:
	rm -rf $(VENV) .pytest_cache
