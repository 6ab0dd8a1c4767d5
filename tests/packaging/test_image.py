"""The Docker image, built from the project's Dockerfile and run for real.

Builds the image, checks that it runs as the unprivileged user with a passing
HEALTHCHECK, runs the compose topology's containers one by one (``migrate``,
``bootstrap``, ``api``, ``worker``) with host networking against this
machine's PostgreSQL and Redis, and runs the Postman collection with newman
against the containerised api (async jobs go through Redis to the worker
container).

Where no image registry is reachable (our CI machine), the Dockerfile's
``PYTHON_IMAGE`` is replaced by a local Debian bookworm + python3.11 base made
by ``scripts/docker-local.sh base-image`` (cached under /var/cache). Set
``IMAGE_TEST_PYTHON_IMAGE`` to choose the base yourself. Build and run times
are written to ``run/image-test-times.txt`` (``.ci/run`` prints them).

Skipped with the reason when no Docker engine answers; a failure under CI
(``.ci/run`` installs docker.io and starts dockerd first).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests

from ..conftest import free_port, need, port_open, wait_for
from .postman import NEWMAN, run_newman

ROOT = Path(__file__).resolve().parents[2]
TIMES = ROOT / "run" / "image-test-times.txt"
TAG = os.environ.get("IMAGE_TEST_TAG", "model-api:test")
APP_UID = 10001

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.model, pytest.mark.slow, pytest.mark.docker]


def docker(*args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _engine_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _record(line: str) -> None:
    TIMES.parent.mkdir(exist_ok=True)
    with TIMES.open("a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def _dockerfile_default_base() -> str:
    m = re.search(r"^ARG PYTHON_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert m, "Dockerfile has no ARG PYTHON_IMAGE=..."
    return m.group(1)


def _base_image() -> str:
    chosen = os.environ.get("IMAGE_TEST_PYTHON_IMAGE")
    if chosen:
        return chosen
    default = _dockerfile_default_base()
    if docker("image", "inspect", default, check=False).returncode == 0:
        return default
    # no registry here: a local stand-in (debootstrap once, then cached)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "docker-local.sh"), "base-image"], capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, f"scripts/docker-local.sh base-image failed:\n{r.stderr[-3000:]}"
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def image() -> str:
    need(_engine_answers(), "no Docker engine answers `docker info` (start dockerd, or run .ci/run)")
    TIMES.unlink(missing_ok=True)
    base = _base_image()
    t0 = time.monotonic()
    # the classic builder: BuildKit would fetch its Dockerfile frontend from a registry
    r = subprocess.run(
        ["docker", "build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base}", "-t", TAG, "."],
        cwd=ROOT, env={**os.environ, "DOCKER_BUILDKIT": "0"}, capture_output=True, text=True, timeout=1800,
    )
    seconds = time.monotonic() - t0
    assert r.returncode == 0, f"docker build failed after {seconds:.0f}s:\n{r.stdout[-5000:]}\n{r.stderr[-3000:]}"
    cached = r.stdout.count("Using cache")
    steps = len(re.findall(r"^Step \d+/\d+", r.stdout, re.M))
    _record(f"image build: {seconds:.1f} s ({cached} of {steps} steps from the layer cache; base {base})")
    return TAG


def test_image_runs_as_the_unprivileged_user(image):
    config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"].split(":")[0] == "app"
    out = docker("run", "--rm", "--network", "host", image, "id", "-u").stdout.strip()
    assert out == str(APP_UID)
    # the model is inside the image, and the CLI answers with our version
    out = docker("run", "--rm", "--network", "host", image, "model-api", "--version").stdout
    assert out.startswith("model-api "), out
    assert "--yes" in docker("run", "--rm", "--network", "host", image, "model-api", "users", "delete",
                             "--help").stdout


class Containers:
    """The containers of one test module, removed at the end whatever happens."""

    def __init__(self, image: str, env: dict[str, str]):
        self.image, self.env, self.names = image, env, []

    def _env_args(self, extra: dict[str, str]) -> list[str]:
        out = []
        for k, v in {**self.env, **extra}.items():
            out += ["-e", f"{k}={v}"]
        return out

    def run_once(self, *cmd: str, stdin: str | None = None, timeout: float = 180, **extra: str):
        return docker("run", "--rm", "-i", "--network", "host", *self._env_args(extra), self.image, *cmd,
                      input=stdin or "", timeout=timeout, check=False)

    def start(self, role: str, *cmd: str, **extra: str) -> str:
        name = f"model-api-test-{role}-{uuid.uuid4().hex[:6]}"
        docker("run", "-d", "--name", name, "--network", "host", *self._env_args(extra), self.image, *cmd)
        self.names.append(name)
        return name

    def state(self, name: str) -> dict:
        return json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)

    def logs(self, name: str) -> str:
        r = docker("logs", "--tail", "60", name, check=False)
        return r.stdout + r.stderr

    def all_logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.logs(n)}" for n in self.names)

    def remove_all(self) -> None:
        for name in self.names:
            docker("rm", "-f", name, check=False)


def _fresh_database(db_url: str) -> str:
    """A database of its own next to the test database (the suite drops tables in that one)."""
    import psycopg

    u = urlparse(db_url.replace("+psycopg", ""))
    name = f"{u.path.lstrip('/') or 'test'}_image"
    admin = u._replace(scheme="postgresql", path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return u._replace(scheme="postgresql", path=f"/{name}").geturl()


@pytest.fixture(scope="module")
def services(db_url) -> str:
    """What the containers need besides the image: checked before a (long) build."""
    need(db_url.startswith("postgresql"), "the image test needs PostgreSQL (set DATABASE_URL)")
    need(NEWMAN.exists(), "newman is not installed: run `make newman`")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    r = urlparse(redis_url)
    need(port_open(r.hostname or "127.0.0.1", r.port or 6379), f"Redis not reachable at {redis_url}")
    return redis_url


@pytest.fixture(scope="module")
def topology(services, image, db_url):
    redis_url = services
    for url in (db_url, redis_url):
        assert urlparse(url.replace("+psycopg", "")).hostname in ("127.0.0.1", "localhost"), (
            f"{url}: the containers share the host's network, so it must point at this machine")
    port = free_port()
    env = {
        "ENV": "production",
        "SECRET_KEY": secrets.token_hex(24),
        "DATABASE_URL": _fresh_database(db_url),
        "CELERY_BROKER_URL": redis_url,
        # a queue of its own: other test runs on this Redis must not take our jobs
        "CELERY_QUEUE": f"model_api.image-test.{uuid.uuid4().hex[:8]}",
        "PORT": str(port),
        "WEB_THREADS": "8",
        # api and worker each load the model: one llama.cpp thread each on a 2-core machine
        "MODEL_N_THREADS": "1",
    }
    c = Containers(image, env)
    started = time.monotonic()
    try:
        yield c, port, started
    finally:
        c.remove_all()


def test_migrate_bootstrap_api_and_worker_containers_with_newman(topology):
    c, port, started = topology
    url = f"http://127.0.0.1:{port}"

    # migrate, then bootstrap: the compose one-shot services
    r = c.run_once("model-api", "db", "upgrade")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "database is up to date" in r.stdout
    admin, admin_pw = f"admin-{uuid.uuid4().hex[:6]}", secrets.token_urlsafe(12)
    r = c.run_once("model-api", "bootstrap", ADMIN_USERNAME=admin, ADMIN_PASSWORD=admin_pw)
    assert r.returncode == 0, r.stdout + r.stderr
    assert admin in r.stdout
    r = c.run_once("model-api", "bootstrap", ADMIN_USERNAME=admin, ADMIN_PASSWORD=admin_pw)
    assert "nothing to do" in r.stdout

    worker = c.start("worker", "model-api", "worker")
    api = c.start("api")  # the image's own CMD: gunicorn

    def healthy():
        for name in (api, worker):
            st = c.state(name)
            assert st["Running"], f"{name} exited ({st.get('ExitCode')}):\n{c.all_logs()}"
        return c.state(api).get("Health", {}).get("Status") == "healthy"

    def ready():
        try:
            return requests.get(url + "/ready", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    try:
        # the Dockerfile's HEALTHCHECK (first probe after its 15 s interval)
        wait_for(healthy, timeout=180, interval=1, what="the api container's HEALTHCHECK to pass")
        wait_for(ready, timeout=180, interval=1, what="/ready to answer 200")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{c.all_logs()}") from None
    up_seconds = time.monotonic() - started
    # the container listens on every interface (development defaults to loopback only)
    assert "0.0.0.0:" in c.logs(api)

    users = {}
    for role in ("main", "other"):
        name, pw = f"{role}-{uuid.uuid4().hex[:6]}", secrets.token_urlsafe(12)
        r = c.run_once("model-api", "users", "create", name, "--password-stdin", "--quota", "8", stdin=pw + "\n")
        assert r.returncode == 0, r.stdout + r.stderr
        users[role] = (name, pw)
    r = c.run_once("model-api", "keys", "create", users["main"][0], "--name", "newman")
    assert r.returncode == 0, r.stderr
    api_key = r.stdout.strip().splitlines()[-1]

    t0 = time.monotonic()
    run_newman(url, users["main"], users["other"], api_key, report_dir=ROOT / "run")
    newman_seconds = time.monotonic() - t0
    # the async jobs of the collection really ran in the worker container
    assert "job completed" in c.logs(worker), c.logs(worker)
    _record(f"image run: containers up and ready in {up_seconds:.1f} s; newman {newman_seconds:.1f} s")

