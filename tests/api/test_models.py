"""Many models behind one API (MODELS_FILE), with the real SmolLM2 GGUF loaded
twice under two ids with different settings: routing by ``model``, the model id
stored on every row, unknown models, per-model defaults and caps, async jobs."""

from __future__ import annotations

import json
import textwrap
import uuid

import pytest
from sqlalchemy import select

from model_api.models import Call, User
from model_api.models_file import ModelsFileError

from ..conftest import wait_for

MODELS = """\
default: long
models:
  short:
    backend: batching
    n_ctx: 512
    n_parallel: 1
    defaults: {temperature: 0, max_tokens: 5}
    max_tokens_cap: 64
  long:
    backend: llama
    n_ctx: 2048
    aliases: [SmolLM2-135M-Instruct]
"""

#: about 700 tokens: more than `short` holds, well within `long`
LONG_PROMPT = "Count the apples: " + "apple " * 700

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture
def models_file(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(MODELS)
    return path


@pytest.fixture
def client(make_app, models_file):
    return make_app(models_file=str(models_file)).test_client()


def rows(database) -> list[Call]:
    with database.session() as s:
        return list(s.scalars(select(Call).order_by(Call.created_at)))


def used(database, name: str = "alice") -> int:
    with database.session() as s:
        return s.scalar(select(User.used).where(User.username == name))


def test_each_model_answers_by_its_id_and_every_row_stores_the_id(client, make_user, database):
    headers = make_user("alice", quota=10)
    short = client.post("/v1/chat/completions", json={**CHAT, "model": "short"}, headers=headers)
    long = client.post("/v1/chat/completions", json={**CHAT, "model": "long"}, headers=headers)
    by_alias = client.post("/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "1, 2, 3,",
                                                    "max_tokens": 2}, headers=headers)
    seed_default = client.post("/call_model", json={"prompt": "Hi", "max_tokens": 2}, headers=headers)
    seed_short = client.post("/call_model", json={"prompt": "Hi", "max_tokens": 2, "model": "short"}, headers=headers)
    assert [r.status_code for r in (short, long, by_alias, seed_default, seed_short)] == [200, 200, 200, 201, 201]
    assert [short.json["model"], long.json["model"], by_alias.json["model"]] == ["short", "long", "long"]
    assert (seed_default.json["model"], seed_short.json["model"]) == ("long", "short")
    assert [(c.kind, c.model_id, c.model) for c in rows(database)] == [
        ("chat", "short", "short"), ("chat", "long", "long"), ("completion", "long", "long"),
        ("sync", "long", "long"), ("sync", "short", "short")]
    history = client.get("/calls", headers=headers).json["calls"]
    assert [c["model_id"] for c in history] == ["short", "long", "long", "long", "short"]  # newest first


def test_a_prompt_too_long_for_one_model_fits_the_other(client, make_user, database):
    headers = make_user("alice", quota=10)
    r = client.post("/call_model", json={"prompt": LONG_PROMPT, "model": "short"}, headers=headers)
    assert r.status_code == 422 and r.json["error"]["code"] == "prompt_too_long"
    assert r.json["error"]["details"]["context_size"] == 512
    assert client.post("/call_model", json={"prompt": LONG_PROMPT, "max_tokens": 2, "model": "long"},
                       headers=headers).status_code == 201
    assert [c.model_id for c in rows(database)] == ["long"] and used(database) == 1


@pytest.mark.parametrize("path, body, shape", [
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4o"}, "openai"),
    ("/v1/completions", {"prompt": "Hi", "model": "gpt-4o"}, "openai"),
    ("/call_model", {"prompt": "Hi", "model": "gpt-4o"}, "ours"),
    ("/call_model", {"prompt": "Hi", "model": "gpt-4o", "stream": True}, "ours"),
    ("/async_call_model", {"prompt": "Hi", "model": "gpt-4o"}, "ours"),
])
def test_an_unknown_model_is_404_and_charges_nothing(client, make_user, database, path, body, shape):
    headers = make_user("alice")
    r = client.post(path, json=body, headers=headers)
    assert r.status_code == 404 and r.json["error"]["code"] == "model_not_found"
    assert "gpt-4o" in r.json["error"]["message"]
    if shape == "openai":
        assert r.json["error"]["type"] == "not_found_error" and set(r.json["error"]) == {
            "message", "type", "param", "code"}
    else:
        assert set(r.json["error"]) == {"code", "message"}
    assert rows(database) == [] and used(database) == 0


def test_models_are_listed_with_context_size_and_backend_without_loading_them(client, make_user):
    headers = make_user("alice")
    listed = client.get("/v1/models", headers=headers)
    assert listed.status_code == 200
    assert [(m["id"], m["owned_by"], m["context_length"], m["backend"]) for m in listed.json["data"]] == [
        ("short", "model-api", 512, "batching"), ("long", "model-api", 2048, "llama")]
    one = client.get("/v1/models/SmolLM2-135M-Instruct", headers=headers)
    assert one.status_code == 200 and one.json["id"] == "long" and one.json["object"] == "model"
    missing = client.get("/v1/models/gpt-4o", headers=headers)
    assert missing.status_code == 404 and missing.json["error"]["code"] == "model_not_found"


def test_a_models_defaults_and_cap_apply_to_it_alone(client, make_user, database):
    headers = make_user("alice", quota=10)
    r = client.post("/call_model", json={"prompt": "Tell me a long story.", "model": "short"}, headers=headers)
    assert r.status_code == 201 and r.json["usage"]["completion_tokens"] <= 5
    over = client.post("/v1/chat/completions", json={**CHAT, "model": "short", "max_tokens": 65}, headers=headers)
    assert over.status_code == 400 and "max_tokens must be <= 64" in over.json["error"]["message"]
    assert client.post("/v1/chat/completions", json={**CHAT, "model": "long", "max_tokens": 65},
                       headers=headers).status_code == 200  # the global cap (1024) holds for `long`
    short_row, long_row = rows(database)
    assert (short_row.params["max_tokens"], short_row.params["temperature"]) == (5, 0)
    assert (long_row.params["max_tokens"], long_row.params["temperature"]) == (65, 0)


def test_an_async_job_runs_on_the_model_it_was_submitted_to(client, make_user, database):
    headers = make_user("alice")
    job_id = client.post("/async_call_model", json={"prompt": "Hi", "model": "short"}, headers=headers).json["job_id"]

    def finished():
        r = client.get(f"/async_call_status?job_id={job_id}", headers=headers).json
        return r if r["job_status"] != "processing" else None

    status = wait_for(finished, timeout=120, what="the job")
    assert status["job_status"] == "completed" and status["usage"]["completion_tokens"] <= 5
    with database.session() as s:
        call = s.get(Call, uuid.UUID(job_id))
        assert (call.model_id, call.model, call.params["max_tokens"]) == ("short", "short", 5)


def test_a_bad_models_file_stops_the_app_from_starting(make_app, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        models:
          m:
            n_ctx: lots
        """))
    with pytest.raises(ModelsFileError, match=r"bad.yaml:3: models.m.n_ctx"):
        make_app(models_file=str(bad))


@pytest.mark.parametrize("path, body, what", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, "messages"),
    ("/v1/completions", {"prompt": LONG_PROMPT}, "prompt"),
])
def test_a_prompt_over_the_models_context_is_openais_context_length_exceeded_on_v1(client, make_user, database,
                                                                                    path, body, what):
    headers = make_user("alice")
    r = client.post(path, json={**body, "model": "short"}, headers=headers)
    assert r.status_code == 400
    err = r.json["error"]
    assert (err["code"], err["type"], err["param"]) == ("context_length_exceeded", "invalid_request_error", what)
    assert err["message"].startswith(f"This model's maximum context length is 512 tokens. However, your {what} "
                                     "resulted in ")
    assert err["message"].endswith(f"tokens. Please reduce the length of the {what}.")
    assert rows(database) == [] and used(database) == 0


# --- per-model access ---------------------------------------------------------------


@pytest.fixture
def cli(make_app, models_file):
    return make_app(models_file=str(models_file)).test_cli_runner()


def allowed(database, name: str = "alice"):
    with database.session() as s:
        return s.scalar(select(User.allowed_models).where(User.username == name))


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {**CHAT, "model": "long"}),
    ("/v1/completions", {"prompt": "Hi", "model": "SmolLM2-135M-Instruct"}),  # an alias of long
    ("/call_model", {"prompt": "Hi"}),  # the default model, long
    ("/async_call_model", {"prompt": "Hi", "model": "long"}),
])
def test_a_user_limited_to_some_models_is_refused_the_others_and_charged_nothing(client, cli, make_user, database,
                                                                                 path, body):
    headers = make_user("alice")
    assert cli.invoke(args=["users", "set-models", "alice", "short"]).exit_code == 0
    r = client.post(path, json=body, headers=headers)
    assert r.status_code == 403 and r.json["error"]["code"] == "model_not_allowed"
    assert "'long'" in r.json["error"]["message"]
    assert rows(database) == [] and used(database) == 0
    ok = client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1, "model": "short"}, headers=headers)
    assert ok.status_code == 201


def test_models_lists_only_what_the_caller_may_use(client, cli, make_user):
    headers = make_user("alice")
    cli.invoke(args=["users", "set-models", "alice", "short"])
    assert [m["id"] for m in client.get("/v1/models", headers=headers).json["data"]] == ["short"]
    r = client.get("/v1/models/long", headers=headers)
    assert r.status_code == 403 and r.json["error"]["type"] == "permission_error"
    assert cli.invoke(args=["users", "set-models", "alice", "--all"]).exit_code == 0
    assert [m["id"] for m in client.get("/v1/models", headers=headers).json["data"]] == ["short", "long"]


def test_a_key_is_limited_within_its_user_and_basic_auth_keeps_the_users_models(client, cli, make_user, database):
    headers = make_user("alice")
    created = cli.invoke(args=["keys", "create", "alice", "--models", "short"])
    assert created.exit_code == 0, created.output
    bearer = {"Authorization": f"Bearer {created.stdout.strip()}"}
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "long"}, headers=bearer)
    assert r.status_code == 403 and r.json["error"]["code"] == "model_not_allowed"
    assert client.post("/v1/chat/completions", json={**CHAT, "model": "long"}, headers=headers).status_code == 200
    cli.invoke(args=["users", "set-models", "alice", "long"])  # the user's list narrows the key's further
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "short"}, headers=bearer)
    assert r.status_code == 403
    assert "short" in cli.invoke(args=["keys", "list", "alice"]).output


@pytest.mark.parametrize("args, ok, stored", [
    (["short", "SmolLM2-135M-Instruct"], True, ["long", "short"]),  # aliases are stored as ids
    (["gpt-4o"], False, None),
    ([], False, None),
    (["short", "--all"], False, None),
    (["--all"], True, None),
])
def test_set_models_takes_ids_or_aliases_of_served_models_only(cli, make_user, database, args, ok, stored):
    make_user("alice")
    r = cli.invoke(args=["users", "set-models", "alice", *args])
    assert (r.exit_code == 0) == ok, r.output
    assert allowed(database) == stored
    if args == ["gpt-4o"]:
        assert "no model 'gpt-4o' is served (models: long, short)" in r.output


# --- structured output ----------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "colour": {"enum": ["red", "green", "blue"]}},
          "required": ["name", "colour"], "additionalProperties": False}


@pytest.mark.parametrize("model", ["short", "long"])  # the batching and the serialised engine
def test_a_json_schema_response_format_is_enforced_on_local_models(client, make_user, database, model):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = client.post("/v1/chat/completions", json={"model": model, "response_format": fmt, "temperature": 1.0,
                                                  "max_tokens": 60, "messages": [{"role": "user",
                                                                                  "content": "A person?"}]},
                    headers=make_user("alice"))
    assert r.status_code == 200, r.json
    reply = r.json["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(reply), PERSON)
    (row,) = rows(database)
    assert json.loads(row.params["response_format"])["json_schema"]["schema"] == PERSON  # jobs rebuild from it


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "integer", "maximum": 3}}}}, "response_format.json_schema"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, "response_format.type"),
    ("/v1/completions", {"prompt": "Hi", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_a_response_format_we_cannot_enforce_is_a_400_naming_it(client, make_user, database, path, body, param):
    r = client.post(path, json=body, headers=make_user("alice"))
    assert r.status_code == 400 and r.json["error"]["param"] == param, r.json
    assert rows(database) == [] and used(database) == 0


def test_ready_shows_which_models_are_loaded(client, make_user):
    headers = make_user("alice")
    client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=headers)  # the default, long
    body = client.get("/ready").json
    assert body["status"] == "ready"  # the default model decides: the others load on first use
    assert body["components"]["model"]["name"] == "long"
    assert body["components"]["model"]["models"] == {"short": "not loaded", "long": "ready"}
    client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1, "model": "short"}, headers=headers)
    assert client.get("/ready").json["components"]["model"]["models"] == {"short": "ready", "long": "ready"}


@pytest.fixture
def one_resident(make_app, models_file):
    """The same two models, at most one of them resident; a request waits up to ``wait`` s for room."""
    def make(wait: float):
        return make_app(models_file=str(models_file), model_max_loaded=1, model_load_wait_seconds=wait,
                        model_load_at_start=False).test_client()
    return make


def test_with_one_model_resident_the_idle_one_is_unloaded_for_the_other(one_resident, make_user, database):
    client, headers = one_resident(wait=30), make_user("alice")
    assert client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1, "model": "short"},
                       headers=headers).status_code == 201
    # `long` waits until `short` has been idle a moment (a request may be between lookup and engine)
    r = client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1, "model": "long"}, headers=headers)
    assert r.status_code == 201, r.json
    assert client.get("/ready").json["components"]["model"]["models"] == {"short": "unloaded", "long": "ready"}
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'model_api_model_loaded{model="short"} 0.0' in metrics
    assert 'model_api_model_loaded{model="long"} 1.0' in metrics
    assert [row.model_id for row in rows(database)] == ["short", "long"]


def test_a_model_busy_with_a_stream_is_not_unloaded_and_the_other_waits_then_gets_a_503(
        one_resident, make_user, database):
    client, headers = one_resident(wait=1), make_user("alice")
    # `long` (the serialised engine) generates as its reader reads: unread, it stays in flight
    stream = client.post("/v1/chat/completions", headers=headers, buffered=False,
                         json={"model": "long", "stream": True, "max_tokens": 500, "temperature": 1.0,
                               "messages": [{"role": "user", "content": "Tell me a long story."}]})
    assert stream.status_code == 200
    r = client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1, "model": "short"}, headers=headers)
    assert r.status_code == 503 and r.json["error"]["code"] == "model_unavailable", r.json
    assert int(r.headers["Retry-After"]) >= 1
    assert used(database) == 1 and len(rows(database)) == 1  # the refused call cost nothing
    assert client.get("/ready").json["components"]["model"]["models"] == {"short": "not loaded", "long": "ready"}
    stream.close()  # the client goes away: the stream is cancelled, `long` goes idle
    wait_for(lambda: client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1, "model": "short"},
                                 headers=headers).status_code == 201, timeout=60, what="short to load")
    assert client.get("/ready").json["components"]["model"]["models"] == {"short": "ready", "long": "unloaded"}
