"""The docker-compose topology run natively by scripts/stack.sh (migrate,
bootstrap, Celery worker when available, gunicorn) against the real PostgreSQL,
Redis and model, checked end to end: the Postman collection through newman, and
a graceful stop that lets in-flight calls finish.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from datetime import timezone
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
from sqlalchemy import create_engine, delete, select

from model_api.models import Call, User

from ..conftest import free_port, need, port_open, wait_for
from .postman import MAIN_QUOTA, NEWMAN, run_newman

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "scripts" / "stack.sh"

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.model, pytest.mark.slow]


class Stack:
    def __init__(self, env: dict[str, str], url: str, run_dir: Path):
        self.env, self.url, self.run_dir = env, url, run_dir

    def sh(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(STACK), *args], env=self.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)

    def create_user(self, prefix: str, quota: int) -> tuple[str, str]:
        """A fresh user made by the CLI, as an operator would."""
        name, password = f"{prefix}-{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(12)
        r = subprocess.run([str(Path(self.env["BIN"]) / "model-api"), "users", "create", name, "--password-stdin",
                            "--quota", str(quota)], input=password + "\n", env=self.env, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return name, password


@pytest.fixture(scope="module")
def stack(db_url, tmp_path_factory):
    need(db_url.startswith("postgresql"), "the native stack needs PostgreSQL (set DATABASE_URL)")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    r = urlparse(redis_url)
    need(port_open(r.hostname or "127.0.0.1", r.port or 6379), f"Redis not reachable at {redis_url}")
    need(NEWMAN.exists(), "newman is not installed: run `make newman`")
    run_dir = tmp_path_factory.mktemp("stack")
    port = free_port()
    env = {
        **os.environ,
        # make this checkout's code win over any installed copy, in every process the script starts
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        "BIN": str(Path(sys.executable).parent),
        "STACK_RUN_DIR": str(run_dir),
        "DATABASE_URL": db_url,
        "CELERY_BROKER_URL": redis_url,
        "PORT": str(port),
        "BIND": f"127.0.0.1:{port}",
        "SECRET_KEY": secrets.token_hex(16),
        "ADMIN_USERNAME": f"admin-{uuid.uuid4().hex[:8]}",
        "ADMIN_PASSWORD": secrets.token_urlsafe(12),
        "WEB_THREADS": "8",
        "JOB_WORKERS": "1",
        # the api and the Celery worker each load the model: on a 2-core machine,
        # one llama.cpp thread each, or their spinning threads starve each other
        "MODEL_N_THREADS": "1",
    }
    for name in ("STACK_ENV_FILE", "WEB_WORKERS", "WEB_GRACEFUL_TIMEOUT", "WEB_TIMEOUT"):
        env.pop(name, None)
    s = Stack(env, f"http://127.0.0.1:{port}", run_dir)
    up = s.sh("up")
    try:
        assert up.returncode == 0, f"stack.sh up failed:\n{up.stderr}\n{_logs(run_dir)}"
        yield s
    finally:
        down = s.sh("down")
        # the stack wrote users, keys and calls into the test database: leave it as other tests expect it
        engine = create_engine(db_url)
        with engine.begin() as conn:
            conn.execute(delete(Call))
            conn.execute(delete(User))
        engine.dispose()
        assert down.returncode == 0, down.stderr


def _logs(run_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(run_dir.glob("*.log")))


def test_up_runs_migrate_bootstrap_and_a_ready_api(stack):
    status = stack.sh("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "api: running" in status.stdout
    assert "ready: 200" in status.stdout
    assert "database is up to date" in (stack.run_dir / "migrate.log").read_text()
    r = requests.get(stack.url + "/health_check", timeout=10)
    assert r.status_code == 204 and r.content == b""
    # the env file the script used is .env.example with the compose hosts pointed at 127.0.0.1
    native = (stack.run_dir / "env.native").read_text()
    assert "@127.0.0.1:5432/" in native and "redis://127.0.0.1:6379/" in native
    assert "@postgres:" not in native


def test_postman_collection_passes_with_newman(stack):
    main = stack.create_user("main", quota=MAIN_QUOTA)
    other = stack.create_user("other", quota=3)
    r = subprocess.run([str(Path(stack.env["BIN"]) / "model-api"), "keys", "create", main[0], "--name", "newman"],
                       env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    run_newman(stack.url, main, other, r.stdout.strip().splitlines()[-1], report_dir=stack.run_dir)


def _as_utc_timestamp(dt) -> float:
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def test_down_lets_in_flight_calls_finish(stack, db_url):
    """SIGTERM while a sync call and an async job are being generated: both
    complete and are stored before the processes exit."""
    name, pw = stack.create_user("drain", quota=5)
    engine = create_engine(db_url)
    result: dict[str, requests.Response] = {}
    long_call = {"prompt": "Write a long story about a dragon who learns to read.", "max_tokens": 96,
                 "temperature": 0}

    def call() -> None:
        result["sync"] = requests.post(stack.url + "/call_model", json=long_call, auth=(name, pw), timeout=600)

    t = threading.Thread(target=call)
    t.start()

    def rows():
        with engine.connect() as conn:
            return conn.execute(select(Call.kind, Call.status, Call.id, Call.finished_at).join(User)
                                .where(User.username == name)).all()

    wait_for(lambda: any(r.kind == "sync" and r.status == "running" for r in rows()), timeout=120,
             what="the sync call to start")
    job = requests.post(stack.url + "/async_call_model", json={"prompt": "Hello, world!", "max_tokens": 8},
                        auth=(name, pw), timeout=60)
    assert job.status_code == 200, job.text
    job_id = uuid.UUID(job.json()["job_id"])
    # taken by a job runner (the api's threads, or a Celery worker once one runs):
    # from then on a graceful stop must let it finish
    wait_for(lambda: any(r.id == job_id and r.status in ("running", "completed") for r in rows()), timeout=120,
             what="the async job to start")

    told_to_stop = time.time()
    down = stack.sh("down")
    assert down.returncode == 0, down.stderr
    t.join(timeout=600)
    assert "sync" in result, "the sync call got no answer"
    assert result["sync"].status_code == 201, result["sync"].text
    assert result["sync"].json()["response"]
    final = {r.id: r for r in rows()}
    sync_row = final[uuid.UUID(result["sync"].json()["id"])]
    assert sync_row.status == "completed"
    # the call really was in flight when the stack was told to stop
    assert _as_utc_timestamp(sync_row.finished_at) > told_to_stop
    assert final[job_id].status == "completed"
    assert stack.sh("status").returncode == 3
    assert not port_open("127.0.0.1", int(stack.url.rsplit(":", 1)[1]))
    engine.dispose()
