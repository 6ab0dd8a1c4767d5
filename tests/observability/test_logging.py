"""Structured logs through the real JSON handler: one line per request, request ids
carried into async jobs, auth and quota refusals as warnings without secrets."""

from __future__ import annotations

import json
import uuid

from flask.testing import FlaskClient

from ..conftest import DEFAULT_PASSWORD, basic, wait_for
from .helpers import LogCapture

SECRET_PROMPT = "Tell me about the purple walrus of Zanzibar"


def _access(lines, request_id):
    return [ln for ln in lines if ln["logger"] == "model_api.access" and ln.get("request_id") == request_id]


def test_one_json_line_per_request_with_user_route_status_latency_and_usage(client, make_user):
    headers = make_user("alice")
    with LogCapture() as cap:
        r = client.post("/call_model", json={"prompt": SECRET_PROMPT, "max_tokens": 3, "temperature": 0},
                        headers={**headers, "X-Request-ID": "req-log-1"})
    assert r.status_code == 201, r.json
    [line] = _access(cap.lines(), "req-log-1")
    assert line["level"] == "INFO" and line["message"] == "request"
    assert line["user"] == "alice"
    assert (line["method"], line["route"], line["status"]) == ("POST", "/call_model", 201)
    assert isinstance(line["latency_ms"], float) and line["latency_ms"] > 0
    assert line["prompt_tokens"] == r.json["usage"]["prompt_tokens"]
    assert line["completion_tokens"] == r.json["usage"]["completion_tokens"]
    assert line["model_seconds"] > 0
    assert line["timestamp"].endswith("+00:00") and isinstance(line["pid"], int)
    # prompts, responses and passwords stay out of the logs
    assert SECRET_PROMPT not in cap.text
    assert r.json["response"].strip() not in cap.text
    assert DEFAULT_PASSWORD not in cap.text


def test_the_line_is_written_once_the_reply_is(app, make_user):
    headers = make_user("alice")
    client = FlaskClient(app)  # Flask's own: it closes nothing, as a server does once it has written a reply
    with LogCapture() as cap:
        r = client.post("/call_model", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0},
                        headers={**headers, "X-Request-ID": "req-after-reply"})
        usage = r.json["usage"]  # the whole reply, read
        assert r.status_code == 201 and _access(cap.lines(), "req-after-reply") == []
        r.close()
    [line] = _access(cap.lines(), "req-after-reply")
    assert (line["route"], line["status"], line["completion_tokens"]) == ("/call_model", 201,
                                                                          usage["completion_tokens"])


def test_a_streamed_call_logs_its_usage_when_the_stream_ends(client, make_user):
    headers = make_user("alice")
    with LogCapture() as cap:
        r = client.post("/v1/chat/completions", headers={**headers, "X-Request-ID": "req-log-sse"},
                        json={"messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 3,
                              "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
        body = r.get_data(as_text=True)
        r.close()
    assert r.status_code == 200 and body.rstrip().endswith("data: [DONE]")
    usage = next(json.loads(ln[6:])["usage"] for ln in body.splitlines() if '"usage": {' in ln or '"usage":{' in ln)
    [line] = _access(cap.lines(), "req-log-sse")
    assert (line["route"], line["status"]) == ("/v1/chat/completions", 200)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert line["model_seconds"] > 0


def test_unmatched_paths_are_logged_under_one_route_label(client):
    with LogCapture() as cap:
        client.get("/no/such/thing/123", headers={"X-Request-ID": "req-404"})
    [line] = _access(cap.lines(), "req-404")
    assert (line["route"], line["path"], line["status"], line["user"]) == ("<unmatched>", "/no/such/thing/123", 404, None)


def test_auth_failures_warn_with_the_user_name_never_the_password(client, make_user):
    make_user("alice")
    wrong = "not-the-password-xyz"
    with LogCapture() as cap:
        assert client.post("/call_model", json={"prompt": "hi"}, headers={**basic("alice", wrong),
                                                                          "X-Request-ID": "req-bad"}).status_code == 401
        assert client.post("/call_model", json={"prompt": "hi"},
                           headers={"X-Request-ID": "req-none"}).status_code == 401
    lines = cap.lines()
    bad = [ln for ln in lines if ln["message"] == "auth failed" and ln.get("request_id") == "req-bad"]
    none = [ln for ln in lines if ln["message"] == "auth failed" and ln.get("request_id") == "req-none"]
    assert len(bad) == 1 and bad[0]["level"] == "WARNING"
    assert (bad[0]["user"], bad[0]["reason"], bad[0]["auth_scheme"]) == ("alice", "invalid", "basic")
    assert len(none) == 1 and none[0]["reason"] == "missing" and none[0]["user"] is None
    assert wrong not in cap.text and DEFAULT_PASSWORD not in cap.text


def test_quota_refusal_warns_with_the_user_name(client, make_user):
    headers = make_user("alice", quota=0)
    with LogCapture() as cap:
        r = client.post("/call_model", json={"prompt": "hi"}, headers={**headers, "X-Request-ID": "req-quota"})
    assert r.status_code == 429
    [refusal] = [ln for ln in cap.lines() if ln["message"] == "quota refused"]
    assert refusal["level"] == "WARNING"
    assert (refusal["user"], refusal["kind"], refusal["request_id"]) == ("alice", "sync", "req-quota")
    assert _access(cap.lines(), "req-quota")[0]["status"] == 429


def test_async_job_log_lines_carry_the_request_id_that_created_the_job(client, make_user):
    headers = make_user("alice")
    rid = f"job-req-{uuid.uuid4().hex[:8]}"
    with LogCapture() as cap:
        r = client.post("/async_call_model", json={"prompt": "Hi", "max_tokens": 2},
                        headers={**headers, "X-Request-ID": rid})
        assert r.status_code == 200
        job_id = r.json["job_id"]

        def done():
            s = client.get(f"/async_call_status?job_id={job_id}", headers=headers).json
            return s["job_status"] != "processing"

        wait_for(done, timeout=120, what="the job to finish")
        wait_for(lambda: any(ln["message"] == "job finished" for ln in cap.lines()), timeout=10,
                 what="the job's last log line")
    job_lines = [ln for ln in cap.lines() if ln.get("job_id") == job_id]
    messages = [ln["message"] for ln in job_lines]
    assert {"job started", "job completed", "job finished"} <= set(messages), messages
    assert all(ln["request_id"] == rid for ln in job_lines), job_lines
    assert all(ln["logger"] == "model_api.services.jobs" for ln in job_lines)
    started = next(ln for ln in job_lines if ln["message"] == "job started")
    assert started["attempt"] == 1 and started["queue_wait_ms"] >= 0


def test_unusable_request_ids_are_replaced(client):
    for bad in ("x" * 65, "caf\u00e9", "a\tb"):
        got = client.get("/health_check", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
        assert got != bad and len(got) == 32
