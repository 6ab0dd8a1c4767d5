"""``fallbacks``: when a model's upstream fails before its first token, the next
id is tried, and the row names the model that answered. The broken upstream is a
port nobody listens on; the fallback is the real SmolLM2."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from model_api.models import Call, User

from ..conftest import free_port, wait_for


@pytest.fixture
def client(make_app, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    path = tmp_path / "models.yaml"
    path.write_text(f"""\
default: flaky
models:
  flaky:
    backend: openai
    base_url: {dead}
    upstream_model: anything
    connect_timeout_seconds: 2
    fallbacks: [also-down, local]
  also-down:
    backend: openai
    base_url: {dead}
    upstream_model: anything
    connect_timeout_seconds: 2
  lonely:
    backend: openai
    base_url: {dead}
    upstream_model: anything
    connect_timeout_seconds: 2
  local:
    backend: llama
    n_ctx: 512
""")
    return make_app(models_file=str(path)).test_client()


def rows(database) -> list[Call]:
    with database.session() as s:
        return list(s.scalars(select(Call)))


def sse_text(data: bytes) -> str:
    events = [json.loads(line[6:]) for line in data.decode().splitlines()
              if line.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))


@pytest.mark.parametrize("path, body", [
    ("/call_model", {"prompt": "Hi", "max_tokens": 3}),  # the default model, flaky
    ("/v1/chat/completions", {"model": "flaky", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}),
])
def test_a_failing_upstream_falls_back_in_order_and_the_row_names_the_model_that_answered(
        client, make_user, database, path, body):
    r = client.post(path, json=body, headers=make_user("alice"))
    assert r.status_code in (200, 201), r.json
    assert r.json["model"] == "local"
    (row,) = rows(database)
    assert (row.model_id, row.status, row.charged) == ("local", "completed", True)


def test_a_streamed_call_falls_back_before_its_first_chunk(client, make_user, database):
    r = client.post("/v1/chat/completions", json={"model": "flaky", "max_tokens": 3, "stream": True,
                                                  "messages": [{"role": "user", "content": "Hi"}]},
                    headers=make_user("alice"))
    assert r.status_code == 200 and sse_text(r.data)
    assert [row.model_id for row in rows(database)] == ["local"]


def test_without_fallbacks_a_failing_upstream_is_a_502_refunded(client, make_user, database):
    r = client.post("/call_model", json={"prompt": "Hi", "model": "lonely"}, headers=make_user("alice"))
    assert r.status_code == 502 and r.json["error"]["code"] == "upstream_error"
    (row,) = rows(database)
    assert (row.model_id, row.status, row.charged) == ("lonely", "failed", False)


def test_a_fallback_the_caller_may_not_use_is_skipped(client, cli_of, make_user, database):
    headers = make_user("alice")
    assert cli_of(client).invoke(args=["users", "set-models", "alice", "flaky", "also-down"]).exit_code == 0
    r = client.post("/call_model", json={"prompt": "Hi"}, headers=headers)
    assert r.status_code == 502  # also-down failed too; local was never tried
    assert [row.model_id for row in rows(database)] == ["also-down"]
    with database.session() as s:
        assert s.scalar(select(User.used)) == 0


@pytest.fixture
def cli_of():
    return lambda client: client.application.test_cli_runner()


def test_an_async_job_falls_back_as_a_sync_call_does(client, make_user, database):
    r = client.post("/async_call_model", json={"prompt": "Hi", "max_tokens": 3}, headers=make_user("alice"))
    assert r.status_code == 200, r.json
    wait_for(lambda: rows(database)[0].status == "completed", timeout=120, what="the job to complete")
    (row,) = rows(database)
    assert (row.model_id, row.charged, row.params["fallbacks"]) == ("local", True, ["also-down", "local"])
