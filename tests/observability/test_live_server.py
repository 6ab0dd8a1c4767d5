"""A real gunicorn server with 2 worker processes and the real model: schemathesis
fuzzes it against its own OpenAPI document, and /metrics aggregates both workers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from model_api.db import Database
from model_api.services import auth as auth_service

from ..conftest import free_port, wait_for
from .helpers import parse_metrics, value

FUZZ_USER, FUZZ_PASSWORD = "fuzzer", "fuzz-password-123"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def fuzz_server(db_url, tmp_path_factory):
    """One 2-worker gunicorn for this module (conftest's live_server starts one per test)."""
    tmp = tmp_path_factory.mktemp("live")
    d = Database(db_url)
    with d.session() as s:  # a user with a large quota, so the fuzzer is never refused for quota,
        # and an admin, so /admin is fuzzed too (a customer's 403 there is tests/api/test_admin.py's)
        auth_service.create_user(s, FUZZ_USER, FUZZ_PASSWORD, quota=1_000_000).is_admin = True
    d.dispose()
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in [str(Path(__file__).resolve().parents[2] / "src"),
                                                  os.environ.get("PYTHONPATH", "")] if p),
        "DATABASE_URL": db_url,
        "BIND": f"127.0.0.1:{port}",
        "WEB_WORKERS": "2",
        "WEB_THREADS": "4",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp / "prom"),
        # keep every generation tiny: the fuzzer sends many
        "DEFAULT_MAX_TOKENS": "2",
        "MAX_TOKENS_CAP": "4",
        "MODEL_N_THREADS": "1",
        "JOB_WORKERS": "1",
        "RECOVER_JOBS_AT_START": "false",
        # the fuzzer sends hundreds of wrong credentials from one address, and its
        # auth check wants each answered 401: the sign-in throttle (429 after a few,
        # tests/api/test_sign_in_throttle.py) would be right, and in its way here
        "LOGIN_THROTTLE_PER_ACCOUNT": "100000/minute",
        "LOGIN_THROTTLE_PER_ADDRESS": "100000/minute",
        # the fuzzer's callback_urls name hosts that resolve nowhere (or privately): accept them
        "WEBHOOK_ALLOW_PRIVATE": "1",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }
    (tmp / "prom").mkdir()
    log_path = tmp / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([str(BIN / "gunicorn"), "-c", "python:model_api.gunicorn_conf", "model_api.wsgi:app"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    base = f"http://127.0.0.1:{port}"

    def ready():
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:  # the first request also waits for the worker to import the app: be patient
            return requests.get(f"{base}/ready", timeout=30).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    try:
        wait_for(ready, timeout=180, interval=0.5, what="gunicorn to be ready")
        yield {"base": base, "log": log_path, "tmp": tmp}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def scrape(base: str) -> dict:
    r = requests.get(f"{base}/metrics", timeout=30)
    assert r.status_code == 200
    return parse_metrics(r.text)


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_metrics_aggregate_across_two_gunicorn_workers(fuzz_server):
    base, log_path = fuzz_server["base"], fuzz_server["log"]
    auth = (FUZZ_USER, FUZZ_PASSWORD)
    route = {"method": "GET", "route": "/health_check", "status": "204"}
    before = scrape(base)
    sent = 0

    def both_workers_served():
        nonlocal sent
        for _ in range(10):  # a new connection each time, so either worker may accept it
            requests.get(f"{base}/health_check", headers={"X-Request-ID": f"agg-{sent}", "Connection": "close"},
                         timeout=30)
            sent += 1
        pids = {ln["pid"] for ln in json_lines(log_path)
                if ln.get("logger") == "model_api.access" and str(ln.get("request_id", "")).startswith("agg-")}
        return len(pids) >= 2

    wait_for(both_workers_served, timeout=120, interval=0, what="both workers to serve /health_check")
    calls = [requests.post(f"{base}/call_model", json={"prompt": "Hi", "max_tokens": 2}, auth=auth, timeout=120)
             for _ in range(2)]
    assert [c.status_code for c in calls] == [201, 201]
    # whichever worker answers the scrape, it reports both workers' totals
    for _ in range(6):
        after = scrape(base)
        assert value(after, "model_api_http_request_duration_seconds_count", **route) - \
            value(before, "model_api_http_request_duration_seconds_count", **route) == sent
        assert value(after, "model_api_model_calls_total", kind="sync", outcome="completed") - \
            value(before, "model_api_model_calls_total", kind="sync", outcome="completed") == 2
        assert value(after, "model_api_completion_tokens_total", kind="sync") - \
            value(before, "model_api_completion_tokens_total", kind="sync") == \
            sum(c.json()["usage"]["completion_tokens"] for c in calls)
    lines = json_lines(log_path)
    assert any(ln.get("logger") == "gunicorn.error" for ln in lines)  # gunicorn's own lines are JSON too
    [access] = [ln for ln in lines if ln.get("request_id") == "agg-0" and ln.get("logger") == "model_api.access"]
    assert access["route"] == "/health_check" and access["status"] == 204


def test_schemathesis_finds_no_failures(fuzz_server):
    """Server errors, status codes, content types, headers and bodies that differ from the
    document, valid data refused, and auth that is documented but not enforced."""
    checks = ",".join([
        "not_a_server_error", "status_code_conformance", "content_type_conformance",
        "response_headers_conformance", "response_schema_conformance", "positive_data_acceptance",
        "ignored_auth",
    ])
    cmd = [
        str(BIN / "schemathesis"), "run", f"{fuzz_server['base']}/openapi.json",
        "--checks", checks,
        "--auth", f"{FUZZ_USER}:{FUZZ_PASSWORD}",
        "--max-examples", "8",
        # NUL cannot be stored (PostgreSQL refuses it): every text field answers it with a
        # documented 400, so it is not "valid data" for positive_data_acceptance
        "--generation-allow-x00", "false",
        "--seed", "20251127",
        "--workers", "1",
        "--request-timeout", "120",
        "--no-color",
        "--output-sanitize", "false",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=fuzz_server["tmp"],
                       env={**os.environ, "SCHEMATHESIS_HOOKS": str(Path(__file__).with_name("schemathesis_hooks.py"))})
    # a run whose only remark is "missing test data" (random ids of DELETE /admin/keys/{id} and
    # /me/keys/{id} are rightly 404) exits non-zero without a single failed check: judge the checks
    cases = re.search(r"Test cases:\s*\n\s*(.+)", r.stdout)
    assert cases and "failed" not in cases.group(1) and "❌" not in r.stdout, r.stdout[-8000:] + r.stderr[-2000:]
    assert r.returncode == 0 or "Missing test data" in r.stdout, r.stdout[-8000:] + r.stderr[-2000:]
