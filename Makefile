# The two commands of the README: `make demo` and `make test`. Both set up
# everything themselves on a machine with only Python 3.11 and Java 17.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
JARS := infra/jars/lib
JARS_S3 := infra/jars/lib-s3
JARS_PROFILE ?=
export USERFORMER_HOME ?= $(CURDIR)/var
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PYSPARK_PYTHON := $(CURDIR)/$(PY)
export SPARK_LOCAL_IP := 127.0.0.1
# mkdocs-material prints a notice about MkDocs 2 on every build; the site does not depend on it.
export NO_MKDOCS_2_WARNING := 1

.PHONY: venv jars jars-s3 demo airflow test test-fast bench docs docs-serve lock clean cluster-up cluster-down help

help:
	@echo "make demo   - set up, generate 7 days of synthetic logs, run daily_refresh on them through Airflow"
	@echo "make airflow - Airflow standalone on 127.0.0.1 with the project's DAGs (prints URL + login; Ctrl-C stops)"
	@echo "make test   - set up and run the test suite"
	@echo "make bench  - run tests/benchmarks (not part of CI)"
	@echo "make docs   - build the documentation site into site/ (MkDocs Material, strict; results from their files)"
	@echo "make docs-serve - serve the site on http://127.0.0.1:8000, rebuilt on changes (Ctrl-C stops)"
	@echo "make lock   - re-resolve requirements.lock from pyproject.toml"
	@echo "make jars   - (re)install Delta's Spark JARs into infra/jars/lib (JARS_PROFILE=s3 adds the S3A connector)"
	@echo "make jars-s3 - Delta's JARs with the S3A connector into infra/jars/lib-s3 (for a warehouse in S3)"

venv: $(VENV)/.installed $(JARS)/.installed

# Delta's Spark JARs, resolved by Maven from infra/jars/pom.xml and checked
# against infra/jars/jars.sha256 (see infra/jars/README.md).
$(JARS)/.installed: infra/jars/pom.xml infra/jars/jars.sha256 infra/jars/fetch.sh
	bash infra/jars/fetch.sh $(JARS_PROFILE)
	touch $@

jars:
	bash infra/jars/fetch.sh $(JARS_PROFILE)
	touch $(JARS)/.installed

# The S3A connector's set (Delta's JARs + hadoop-aws + the AWS SDK bundle, about
# 690 MB) in its own folder: Spark sessions that write to a bucket point
# spark.jars_dir at it; the others keep the small default set.
$(JARS_S3)/.installed: infra/jars/pom.xml infra/jars/jars-s3.sha256 infra/jars/fetch.sh
	bash infra/jars/fetch.sh s3 $(JARS_S3)
	touch $@

jars-s3: $(JARS_S3)/.installed

# torch==2.13.0 first and alone, pinned exactly: an unpinned install would pull a newer
# build. Where pip's find-links hold a CPU wheel of 2.13.0 it takes that one;
# otherwise the index serves the CUDA build (larger; it runs on CPUs too).
# Then the locked set, then the project.
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==26.3"
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The demo has a home of its own (var/demo), never the one `make airflow` and the CLI use, unless USERFORMER_HOME is
# given on the command line or in the environment.
DEMO_HOME = $(if $(filter environment command line,$(origin USERFORMER_HOME)),$(USERFORMER_HOME),$(CURDIR)/var/demo)
demo: venv
	USERFORMER_HOME=$(DEMO_HOME) $(BIN)/userformer demo

# AIRFLOW_PORT=8080 by default (a free port if 8080 is taken); state under $(USERFORMER_HOME)/airflow.
airflow: venv
	$(BIN)/userformer airflow start $(if $(AIRFLOW_PORT),--port $(AIRFLOW_PORT))

# Lint, format, the layers and the docs site first (seconds), then the suite.
test: venv $(JARS_S3)/.installed
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/lint-imports
	$(BIN)/mkdocs build --strict --quiet --site-dir build/site
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest tests -m "not slow and not cluster" $(PYTEST_ARGS)

bench: venv
	$(PY) -m tests.benchmarks.run $(BENCH_ARGS)

# The documentation site (mkdocs.yml): docs/ plus the measured results, rendered from tests/benchmarks/results
# and experiments/ by docs/hooks.py. Needs the venv only (not the JARs); built offline; `strict` turns every
# warning (a broken link, a missing anchor) into an error. DOCS_PORT=8000 by default.
docs: $(VENV)/.installed
	$(BIN)/mkdocs build --strict --site-dir site

docs-serve: $(VENV)/.installed
	$(BIN)/mkdocs serve --strict --dev-addr 127.0.0.1:$(or $(DOCS_PORT),8000)

cluster-up: venv
	bash infra/spark/start-cluster.sh

cluster-down:
	bash infra/spark/stop-cluster.sh

# Re-resolve the lock in a scratch venv (torch==2.13.0 first, as above).
lock:
	rm -rf /tmp/userformer-lock && $(PYTHON) -m venv /tmp/userformer-lock
	/tmp/userformer-lock/bin/pip install --quiet --upgrade "pip==26.3"
	/tmp/userformer-lock/bin/pip install --quiet "torch==2.13.0"
	/tmp/userformer-lock/bin/pip install --quiet ".[test]"
	{ echo "# Resolved, pinned dependency set (one resolve on Python 3.11, Linux x86_64)."; \
	  echo "# torch==2.13.0 is installed first, alone, from its pinned CPU build: see Makefile."; \
	  echo "# Regenerate with: make lock"; \
	  /tmp/userformer-lock/bin/pip freeze --all | grep -vE '^(torch==|userformer|-e |pip==)'; } > requirements.lock

clean:
	rm -rf $(VENV) var build site *.egg-info $(JARS) $(JARS_S3)
