# avatarforge — the verbs. `make help` lists them.
# The venv is made from the system python3.11 on purpose: Triton's 3.11 python-backend stub
# links the system libpython3.11.so.1.0, so this venv also works as a Triton EXECUTION_ENV_PATH.
SYSTEM_PYTHON ?= $(shell command -v /usr/bin/python3.11 || command -v python3.11)
VENV   := .venv
PY     := $(VENV)/bin/python
AF     := $(VENV)/bin/avatarforge
STAMP  := $(VENV)/.avatarforge-installed
PYTEST_ARGS ?=
LINT_DIRS := $(wildcard src tests bench model_repository training_container conda_envs)

.DEFAULT_GOAL := help
.PHONY: help setup demo test lint clean base env package local-triton local-mme deploy-mme training-image bench

help:  ## list the verbs
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install everything (idempotent; quick when done)

$(STAMP): pyproject.toml
	@test -n "$(SYSTEM_PYTHON)" || { echo "error: python3.11 not found (the Triton stub needs the system 3.11)"; exit 1; }
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	# torch first: the local CPU build; anything else would pull a multi-GB CUDA build
	$(PY) -m pip install --disable-pip-version-check -q torch==2.13.0
	$(PY) -m pip install --disable-pip-version-check -q torch==2.13.0 -e ".[all]"
	$(PY) -m pip install --disable-pip-version-check -q --no-deps \
	  $$($(PY) -c "import tomllib;print(' '.join(tomllib.load(open('pyproject.toml','rb'))['tool']['avatarforge']['no-deps']))")
	touch $@

base: $(STAMP)  ## build the embedded tiny SD 2.1-shaped base into build/base/tiny-sd21
	$(AF) base build

demo: $(STAMP)  ## run the whole path on the tiny base and sample photos; results in build/demo/
	$(AF) demo

lint: $(STAMP)  ## ruff + hadolint
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)
	@if ls training_container/Dockerfile >/dev/null 2>&1; then $(VENV)/bin/hadolint training_container/Dockerfile; fi

test: $(STAMP) lint  ## lint, then the whole pytest suite (unit + integration with real servers)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:  ## remove build/ (keeps .venv)
	rm -rf build .pytest_cache .ruff_cache

env: $(STAMP)  ## serving env for EXECUTION_ENV_PATH: conda-pack if conda, else build/envs/serve venv (PACK=1: tar.gz)
	$(PY) conda_envs/build_env.py $(if $(PACK),--pack)

local-mme: $(STAMP)  ## tritonserver with the SageMaker front end + TargetModel loader on build/package (Ctrl-C stops)
	$(AF) mme serve $(if $(SOURCE),--source $(SOURCE)) $(if $(MAX_LOADED),--max-loaded $(MAX_LOADED))

package: $(STAMP)  ## package a user's adapter as build/package/USER.tar.gz (make package USER=x)
	@# USER is also the login name in the environment: only a USER given on the command line counts
	@test "$(origin USER)" = "command line" || { echo "usage: make package USER=name"; exit 2; }
	$(AF) package --user $(USER)

local-triton: $(STAMP)  ## serve model_setup + the packaged users from tritonserver; Ctrl-C stops
	$(AF) serve local-triton

bench: $(STAMP)  ## trainer memory/speed variants and serving density, side by side; JSON in build/bench/
	$(PY) bench/train_memory.py
	$(PY) bench/serving_density.py

deploy-mme training-image:
	@echo "make $@: not built yet (a later issue adds it)"; exit 2
