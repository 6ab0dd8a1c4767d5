"""A real Celery worker (started as documented, ``model-api worker``) with
WORKER_METRICS_PORT: its port reports what its pool process did, and its log
lines are JSON carrying the request_id of the request that created the job.

Real Redis (REDIS_URL, own queue name), the real model, the test database.
"""

from __future__ import annotations

import json
import os
import uuid
from urllib.parse import urlparse

import pytest
import requests

from ..conftest import free_port, need, port_open, wait_for
from ..jobs.procs import Worker, env_for
from .helpers import parse_metrics, value

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/1")


def test_worker_metrics_port_counts_jobs_run_in_its_pool_and_logs_carry_the_request_id(
    make_app, make_user, db_url, tmp_path
):
    u = urlparse(REDIS_URL)
    need(port_open(u.hostname or "127.0.0.1", u.port or 6379), f"Redis not reachable at {REDIS_URL}")
    queue = f"model_api.test.{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = env_for(db_url, celery_broker_url=REDIS_URL, celery_queue=queue, worker_metrics_port=port,
                  reconcile_interval_seconds=3600, log_format="json")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the worker makes its own
    worker = Worker(env, tmp_path / "worker.log", f"metrics-{queue}", via_cli=True)  # prefork, 1 pool process
    try:
        worker.wait_ready()
        app = make_app(celery_broker_url=REDIS_URL, celery_queue=queue)
        client = app.test_client()
        headers = {**make_user("alice"), "X-Request-ID": "obs-worker-req-1"}
        r = client.post("/async_call_model", json={"prompt": "Say hi.", "max_tokens": 2, "temperature": 0},
                        headers=headers)
        assert r.status_code == 200, r.json
        job_id = r.json["job_id"]

        def final():
            s = client.get(f"/async_call_status?job_id={job_id}", headers=headers).json
            return s if s["state"] in ("completed", "failed", "cancelled") else None

        assert wait_for(final, timeout=120, interval=0.3, what="job final")["state"] == "completed"

        scrape = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert scrape.status_code == 200
        m = parse_metrics(scrape.text)
        # counted in the pool process, read through the main process's port
        assert value(m, "model_api_jobs_total", state="running") == 1
        assert value(m, "model_api_jobs_total", state="completed") == 1
        assert value(m, "model_api_model_calls_total", kind="async", outcome="completed") == 1
        assert value(m, "model_api_completion_tokens_total", kind="async") >= 1
        assert any(name == "model_api_model_info" for name, _ in m), "the pool process's model is reported"

        lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
        done = [ln for ln in lines if ln.get("message") == "job completed"]
        assert done, worker.log()[-3000:]
        assert done[0]["job_id"] == job_id and done[0]["request_id"] == "obs-worker-req-1"
        assert any(" ready." in ln.get("message", "") for ln in lines)  # Celery's own lines are JSON too
    finally:
        worker.stop()
    metrics_dirs = [ln.get("multiprocess_dir") for ln in map(json.loads, filter(
        lambda x: x.startswith("{"), worker.log().splitlines())) if ln.get("message") == "serving metrics"]
    assert metrics_dirs and metrics_dirs[0] and not os.path.exists(metrics_dirs[0]), "temporary dir removed at exit"
