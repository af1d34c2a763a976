# avatarforge — the verbs. `make help` lists them.
# The venv is made from the system python3.11 on purpose: Triton's 3.11 python-backend stub
# links the system libpython3.11.so.1.0, so this venv also works as a Triton EXECUTION_ENV_PATH.
SYSTEM_PYTHON ?= $(shell command -v /usr/bin/python3.11 || command -v python3.11)
VENV   := .venv
PY     := $(VENV)/bin/python
AF     := $(VENV)/bin/avatarforge
STAMP  := $(VENV)/.avatarforge-installed
PYTEST_ARGS ?=
# The suite in TEST_WORKERS pytest processes (pytest-xdist; 0: one), a module at a time in each, so
# a module's servers and fixtures stay in one process; each has its own build/test-cache-gwN. Its
# tests wait on servers as much as they compute: 22 -> 11 minutes on 2 cores.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile
LINT_DIRS := $(wildcard src tests bench model_repository training_container conda_envs)

.DEFAULT_GOAL := help
.PHONY: help setup demo demo-service demo-cloud api test test-fast lint clean base env package export local-triton local-mme \
        deploy-mme deploy-training destroy training-image bench bench-gpu gpu-bundle bench-quality reliability

help:  ## list the verbs
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install everything (idempotent; quick when done)

$(STAMP): pyproject.toml
	@test -n "$(SYSTEM_PYTHON)" || { echo "error: python3.11 not found (the Triton stub needs the system 3.11)"; exit 1; }
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	@# pip without -q: a line per package and its download bars. pip then unpacks in silence
	@# (4 min measured on a loaded machine): a line every 20 s says how much of the venv is written.
	@echo "== setup 1/3: torch, the CPU build (~750 MB installed)"
	# torch first: the local CPU build; anything else would pull a multi-GB CUDA build
	@(while sleep 20; do echo "   ... still installing: $$(du -sm $(VENV) | cut -f1) MB in $(VENV)"; done) & tick=$$!; \
	  $(PY) -m pip install --disable-pip-version-check torch==2.13.0; status=$$?; kill $$tick; exit $$status
	@echo "== setup 2/3: avatarforge and its dependencies (~140 packages, ~2.3 GB in $(VENV) at the end)"
	@(while sleep 20; do echo "   ... still installing: $$(du -sm $(VENV) | cut -f1) MB in $(VENV)"; done) & tick=$$!; \
	  $(PY) -m pip install --disable-pip-version-check torch==2.13.0 -e ".[all]"; status=$$?; kill $$tick; exit $$status
	@echo "== setup 3/3: packages installed without their dependencies (pyproject.toml: tool.avatarforge.no-deps)"
	$(PY) -m pip install --disable-pip-version-check --no-deps \
	  $$($(PY) -c "import tomllib;print(' '.join(tomllib.load(open('pyproject.toml','rb'))['tool']['avatarforge']['no-deps']))")
	touch $@
	@echo "== setup done: $$(du -sm $(VENV) | cut -f1) MB in $(VENV)"

base: $(STAMP)  ## build the embedded tiny SD 2.1-shaped base into build/base/tiny-sd21
	$(AF) base build

demo: $(STAMP)  ## run the whole path on the tiny base and sample photos; results in build/demo/
	$(AF) demo

lint: $(STAMP)  ## ruff + hadolint
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)
	$(VENV)/bin/hadolint $(wildcard training_container/Dockerfile conda_envs/Dockerfile api_container/Dockerfile)

test: $(STAMP) lint  ## lint, then the whole pytest suite (unit + integration with real servers)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP) lint  ## day-to-day lane: lint, then the suite without the slow tests (CI runs make test)
	AVATARFORGE_TEST_LANE=fast $(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

clean:  ## remove build/ (keeps .venv)
	rm -rf build .pytest_cache .ruff_cache

env: $(STAMP)  ## serving env for EXECUTION_ENV_PATH: conda-pack if conda, else build/envs/serve venv (PACK=1: tar.gz)
	$(PY) conda_envs/build_env.py $(if $(PACK),--pack)

local-mme: $(STAMP)  ## tritonserver's SageMaker front end + TargetModel loader on build/package, on 127.0.0.1:8080 (Ctrl-C stops)
	$(AF) mme serve $(if $(SOURCE),--source $(SOURCE)) $(if $(MAX_LOADED),--max-loaded $(MAX_LOADED)) $(if $(PORT),--port $(PORT))

package: $(STAMP)  ## package a user's adapter as build/package/USER.tar.gz (make package USER=x)
	@# USER is also the login name in the environment: only a USER given on the command line counts
	@test "$(origin USER)" = "command line" || { echo "usage: make package USER=name"; exit 2; }
	$(AF) package --user $(USER)

export: $(STAMP)  ## a user's adapter for ComfyUI / AUTOMATIC1111: build/export/kohya/USER.safetensors
	@test "$(origin USER)" = "command line" || { echo "usage: make export USER=name"; exit 2; }
	$(AF) export $(USER) --format kohya

.PHONY: forget
forget: $(STAMP)  ## delete a user's data and unload them (make forget USER=x [CONFIG=deploy.json] [DRY_RUN=1] [MME=url])
	@test "$(origin USER)" = "command line" || { echo "usage: make forget USER=name [CONFIG=deploy.json] [DRY_RUN=1]"; exit 2; }
	$(AF) forget "$(USER)" $(if $(CONFIG),--config $(CONFIG)) $(if $(DRY_RUN),--dry-run) \
	  $(if $(MME),--mme-sagemaker-url $(MME))

local-triton: $(STAMP)  ## serve model_setup + the packaged users from tritonserver on 127.0.0.1:8000; Ctrl-C stops
	$(AF) serve local-triton $(if $(PORT),--port $(PORT)) $(if $(GRPC_PORT),--grpc-port $(GRPC_PORT)) \
	  $(if $(METRICS_PORT),--metrics-port $(METRICS_PORT))

reliability: $(STAMP)  ## load test of the local MME (20 clients, 30 users, evictions; RSS over 100 load cycles); a table
	$(PY) bench/reliability.py

bench: $(STAMP)  ## trainer variants, serving density, per-user memory, adapter switch + batching; JSON in build/bench/
	$(PY) bench/train_memory.py
	$(PY) bench/serving_density.py
	$(PY) bench/serving_memory.py
	$(PY) bench/adapter_switch.py

# bench-gpu runs where the GPU is (python3 with a CUDA torch, no network, no .venv): the bundle
# made here by gpu-bundle travels beside the tree (device `carry`: build/gpu-bundle)
bench-gpu:  ## full-size SD 2.1 on one GPU, Triton included: unpack + check build/gpu-bundle, then bench/gpu.py; JSON in OUT (env) or build/bench
	bash bench/gpu_run.sh $(if $(BUDGET),--budget-s $(BUDGET)) $(GPU_ARGS)

gpu-bundle: $(STAMP)  ## tritonserver + stub 3.12 + numpy<2 + pinned packages + our wheel for bench-gpu: build/gpu-bundle (< 58 MiB)
	$(PY) bench/gpu_bundle.py build $(if $(NO_LIBPYTHON),,--fetch-libpython)

bench-quality: $(STAMP)  ## training settings by eval scores + adapter size (GPU, BASE=real SD 2.1, DATASET=photos)
	$(PY) bench/quality.py $(if $(BASE),--base $(BASE)) $(if $(DATASET),--dataset $(DATASET)) \
	  $(if $(STEPS),--steps $(STEPS)) $(if $(ONLY),--only $(ONLY))

demo-service: $(STAMP)  ## one training job against a local S3 (moto), then its tarball served by the local MME
	$(AF) demo-service

demo-cloud: $(STAMP)  ## the whole system locally: moto S3/SNS/SQS, async training runner, MME; submit -> generate
	$(AF) demo-cloud

api: $(STAMP)  ## the HTTP API + its web page on 127.0.0.1:8800, on the demo-cloud stack (CONFIG=deploy.json API_CONFIG=api.json: a deployment)
	$(AF) api $(if $(PORT),--port $(PORT)) $(if $(CONFIG),--config $(CONFIG)) $(if $(API_CONFIG),--api-config $(API_CONFIG))

# CONFIG=deploy.json holds the deployment description; DRY_RUN=1 prints the plan and touches
# nothing (no AWS account needed); CREATE_ROLE=1 creates the least-privilege roles too
DEPLOY_ARGS = $(if $(CONFIG),--config $(CONFIG)) $(if $(DRY_RUN),--dry-run) $(if $(CREATE_ROLE),--create-role)

deploy-mme: $(STAMP)  ## S3 layout + shared assets + the SageMaker MME (Triton) endpoint (DRY_RUN=1: plan only)
	$(AF) deploy mme $(DEPLOY_ARGS) $(if $(ENV_TARBALL),--env-tarball $(ENV_TARBALL))

deploy-training: $(STAMP)  ## the async training endpoint (LMI) with SNS topics and scale to zero (DRY_RUN=1)
	$(AF) deploy training $(DEPLOY_ARGS)

destroy: $(STAMP)  ## remove exactly what deploy made (tagged), nothing else (DELETE_DATA=1: its S3 data too)
	$(AF) deploy destroy $(if $(CONFIG),--config $(CONFIG)) $(if $(DRY_RUN),--dry-run) $(if $(DELETE_DATA),--delete-data)

training-image: $(STAMP)  ## build the LMI training image with docker where an engine runs (CONFIG=deploy.json: its region's LMI)
	$(if $(CONFIG),CONFIG=$(CONFIG)) bash training_container/build.sh
