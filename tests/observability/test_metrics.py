"""/metrics after real calls (real model, in-process): every counter moves by exactly
what the calls did. The multi-process case is in test_live_server.py."""

from __future__ import annotations

import json

from ..conftest import basic, wait_for
from .helpers import parse_metrics, value


def scrape(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200, r.data
    assert r.content_type.startswith("text/plain")
    return parse_metrics(r.get_data(as_text=True))


def test_a_sync_call_moves_calls_tokens_model_time_and_latency(app, client, make_user):
    headers = make_user("alice")
    before = scrape(client)
    r = client.post("/call_model", json={"prompt": "Name a fruit.", "max_tokens": 4, "temperature": 0}, headers=headers)
    assert r.status_code == 201, r.json
    after = scrape(client)
    usage = r.json["usage"]

    def delta(name, /, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("model_api_model_calls_total", kind="sync", outcome="completed") == 1
    assert delta("model_api_prompt_tokens_total", kind="sync") == usage["prompt_tokens"]
    assert delta("model_api_completion_tokens_total", kind="sync") == usage["completion_tokens"]
    assert delta("model_api_model_generation_seconds_count", kind="sync") == 1
    assert delta("model_api_model_generation_seconds_sum", kind="sync") > 0
    assert delta("model_api_model_time_to_first_token_seconds_count", kind="sync") == 1
    assert delta("model_api_http_request_duration_seconds_count", method="POST", route="/call_model", status="201") == 1
    assert delta("model_api_http_request_duration_seconds_bucket", method="POST", route="/call_model",
                 status="201", le="+Inf") == 1
    info = app.extensions["model_api"].engine.info()
    assert value(after, "model_api_model_info", name=info["name"], quantisation="Q4_1",
                 context_size=str(info["context_size"])) == 1


def test_quota_refusals_and_auth_failures_are_counted(client, make_user):
    headers = make_user("alice", quota=0)
    before = scrape(client)
    assert client.post("/call_model", json={"prompt": "Hi"}, headers=headers).status_code == 429
    assert client.post("/async_call_model", json={"prompt": "Hi"}, headers=headers).status_code == 429
    assert client.post("/call_model", json={"prompt": "Hi"}).status_code == 401
    assert client.post("/call_model", json={"prompt": "Hi"}, headers=basic("alice", "wrong password")).status_code == 401
    assert client.post("/call_model", json={"prompt": "Hi"}, headers=basic("nobody", "wrong password")).status_code == 401
    after = scrape(client)

    def delta(name, /, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("model_api_quota_refusals_total", kind="sync") == 1
    assert delta("model_api_quota_refusals_total", kind="async") == 1
    assert delta("model_api_auth_failures_total", scheme="basic", reason="missing") == 1
    assert delta("model_api_auth_failures_total", scheme="basic", reason="invalid") == 2
    assert delta("model_api_http_request_duration_seconds_count", method="POST", route="/call_model", status="401") == 3
    assert delta("model_api_model_calls_total", kind="sync", outcome="completed") == 0


def test_an_async_job_moves_job_states_queue_wait_and_its_call(client, make_user):
    headers = make_user("alice")
    before = scrape(client)
    job_id = client.post("/async_call_model", json={"prompt": "Hi", "max_tokens": 2}, headers=headers).json["job_id"]
    final = wait_for(lambda: (s := client.get(f"/async_call_status?job_id={job_id}", headers=headers).json)
                     ["job_status"] != "processing" and s, timeout=120, what="the job")
    assert final["state"] == "completed"
    after = scrape(client)

    def delta(name, /, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("model_api_jobs_total", state="queued") == 1
    assert delta("model_api_jobs_total", state="running") == 1
    assert delta("model_api_jobs_total", state="completed") == 1
    assert delta("model_api_job_queue_wait_seconds_count") == 1
    assert delta("model_api_model_calls_total", kind="async", outcome="completed") == 1
    assert delta("model_api_completion_tokens_total", kind="async") == final["usage"]["completion_tokens"]
    # read from the database at scrape time: nothing is left queued or running
    assert value(after, "model_api_jobs_in_state", state="queued") == 0
    assert value(after, "model_api_jobs_in_state", state="running") == 0


def test_metrics_are_open_locally_and_need_the_token_otherwise(make_app):
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    no_token = make_app().test_client()
    assert no_token.get("/metrics").status_code == 200  # the test client is 127.0.0.1
    r = no_token.get("/metrics", environ_base=remote)
    assert r.status_code == 403 and r.json["error"]["code"] == "forbidden"

    with_token = make_app(metrics_token="s3cret-metrics").test_client()
    r = with_token.get("/metrics", environ_base=remote)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert with_token.get("/metrics", environ_base=remote,
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = with_token.get("/metrics", environ_base=remote, headers={"Authorization": "Bearer s3cret-metrics"})
    assert ok.status_code == 200 and b"model_api_http_request_duration_seconds" in ok.data

    closed = make_app(metrics_token="s3cret-metrics", metrics_local_open=False).test_client()
    assert closed.get("/metrics").status_code == 401  # behind a local proxy everyone looks local
    assert closed.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics"}).status_code == 200


def test_v1_calls_streams_and_bearer_failures_are_counted(client, make_user):
    # /v1 and streamed calls are finalised by the same services.calls functions as the seed's routes
    headers = make_user("alice", quota=5)
    before = scrape(client)
    chat = client.post("/v1/chat/completions", headers=headers, json={
        "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 2, "temperature": 0})
    assert chat.status_code == 200, chat.json
    stream = client.post("/v1/completions", headers=headers, json={
        "prompt": "Once upon a time", "max_tokens": 2, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    assert stream.status_code == 200 and stream.mimetype == "text/event-stream"
    events = [ln.removeprefix("data: ") for ln in stream.get_data(as_text=True).splitlines() if ln.startswith("data: ")]
    stream.close()  # the WSGI server closes the response: the request's line and latency are written then
    assert events[-1] == "[DONE]"
    stream_usage = json.loads(events[-2])["usage"]
    assert client.get("/v1/models", headers={"Authorization": "Bearer mk-not-a-key"}).status_code == 401
    after = scrape(client)

    def delta(name, /, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("model_api_model_calls_total", kind="chat", outcome="completed") == 1
    assert delta("model_api_prompt_tokens_total", kind="chat") == chat.json["usage"]["prompt_tokens"]
    assert delta("model_api_completion_tokens_total", kind="chat") == chat.json["usage"]["completion_tokens"]
    assert delta("model_api_model_calls_total", kind="completion", outcome="completed") == 1
    assert delta("model_api_completion_tokens_total", kind="completion") == stream_usage["completion_tokens"]
    assert delta("model_api_model_time_to_first_token_seconds_count", kind="completion") == 1
    assert delta("model_api_auth_failures_total", scheme="bearer", reason="invalid") == 1
    for route in ("/v1/chat/completions", "/v1/completions"):
        assert delta("model_api_http_request_duration_seconds_count", method="POST", route=route, status="200") == 1
    assert delta("model_api_http_request_duration_seconds_count", method="GET", route="/v1/models", status="401") == 1
