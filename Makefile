# trainflow: `make demo` runs the pipeline on configs/digits.yaml, `make test` runs the suite.
# Both create .venv on first use. Every pip call goes through constraints.txt, which pins
# torch==2.13.0 (the local CPU build; any other torch pulls GBs of CUDA wheels) and fastapi<0.151.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo test lint bench docs system-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, alone and pinned, so no resolver step can reach for a CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt | $(PY)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

# System packages some tests need, from Debian's archive: Chromium and its driver (the browser tests of the
# Prefect and MLflow UIs) and PostgreSQL's server (a throwaway cluster behind the study, MLflow and Prefect;
# Debian keeps its binaries in /usr/lib/postgresql/<version>/bin). CI runs this first; tests never install anything.
SYSTEM_PACKAGES := chromium chromium-driver postgresql
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "system packages present: $(SYSTEM_PACKAGES)"; \
	else \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	fi

demo: $(VENV)/.installed
	$(VENV)/bin/trainflow run configs/digits.yaml --out out/demo

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PIP) -e '.[bench]'
	touch $@

bench: $(VENV)/.installed-bench   # figures in README.md; run on an idle machine
	$(PY) benchmarks/trainer_overhead.py
	$(PY) benchmarks/lr_range_test.py
	$(PY) benchmarks/hpo.py
	$(PY) benchmarks/cached_rerun.py
	$(PY) benchmarks/compression.py
	$(PY) benchmarks/storage.py
	$(PY) benchmarks/ddp_scaling.py

$(VENV)/.installed-docs: $(VENV)/.installed
	$(PIP) -e '.[docs]'
	touch $@

# The site from docs/ into site/ (mkdocs.yml); fails if docs/reference/config.md is stale or on any warning.
docs: $(VENV)/.installed-docs
	$(PY) -m trainflow.core.config.reference --check
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) artifacts mlflow.db out .pytest_cache
