"""The /v1 routes, streaming and API keys through the in-process test client.

The streaming-logic tests use a small gated engine (a fake engine is allowed for
fast logic tests): it yields one token and then waits for the test to let it go
on, which makes "the first chunk reached the client before the generation ended"
an ordering fact instead of a timing guess. The real model and real HTTP are
exercised by tests/live/test_openai_live.py.
"""

from __future__ import annotations

import json
import threading
import uuid

import pytest
from sqlalchemy import select

from model_api.engine.base import Completion, Engine, EngineError, Generation, GenerationRequest, PreparedPrompt
from model_api.models import ApiKey, Call, User

from ..conftest import basic


class GatedEngine(Engine):
    """Yields "Hello", then blocks until ``release`` (or a cancel), then yields the rest."""

    model_name = "gated-model"
    context_size = 1000

    def __init__(self, rest: tuple[str, ...] = (" wide", " world"), fail_after_first: bool = False):
        self.release = threading.Event()
        self.rest = rest
        self.fail_after_first = fail_after_first
        self.finished = threading.Event()  # the generation's loop has ended (any reason)
        self.cancelled = threading.Event()

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        return PreparedPrompt(request, 7)

    def stream(self, prompt, cancel=None, *, incremental=True):
        return _GatedGeneration(self, cancel or threading.Event())


class _GatedGeneration(Generation):
    def __init__(self, engine: GatedEngine, cancel: threading.Event):
        self.e, self.cancel, self.result = engine, cancel, None
        self.it = self._run()

    def __next__(self):
        return next(self.it)

    def close(self):
        self.cancel.set()
        self.it.close()
        if self.result is None:
            self._done("cancelled", ["Hello"])

    def _done(self, reason, pieces):
        self.result = Completion("".join(pieces), 7, len(pieces), reason, self.e.model_name)
        if reason == "cancelled":
            self.e.cancelled.set()
        self.e.finished.set()

    def _run(self):
        pieces = ["Hello"]
        yield "Hello"
        while not self.e.release.wait(0.01):
            if self.cancel.is_set():
                self._done("cancelled", pieces)
                return
        if self.e.fail_after_first:
            self.e.finished.set()
            raise EngineError("the accelerator fell over")
        for p in self.e.rest:
            pieces.append(p)
            yield p
        self._done("stop", pieces)


@pytest.fixture
def gated(app):
    engine = GatedEngine()
    app.extensions["model_api"].engines.install(None, engine)  # the default model's slot; no model load
    return engine


def _events(chunks) -> list:
    out = []
    for raw in chunks:
        for line in raw.decode().split("\n"):
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _first_events(body, n: int) -> list:
    """The first ``n`` events of a stream, read chunk by chunk (events ready
    together arrive in one chunk: api/streaming.py)."""
    out: list = []
    while len(out) < n:
        out += _events([next(body)])
    return out


def _row(database) -> Call:
    with database.session() as s:
        return s.scalars(select(Call)).one()


CHAT = {"model": "anything", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}


def test_first_chunk_reaches_the_client_before_the_generation_ends(client, make_user, gated, database):
    headers = make_user("alice")
    resp = client.post("/v1/chat/completions", json={**CHAT, "stream": True,
                                                     "stream_options": {"include_usage": True}},
                       headers=headers, buffered=False)
    assert resp.status_code == 200
    assert resp.mimetype == "text/event-stream"
    body = iter(resp.response)
    first = _first_events(body, 2)  # role chunk, then the first delta
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first[1]["choices"][0]["delta"] == {"content": "Hello"}
    # the engine is still parked before its second token: the client had "Hello" first
    assert not gated.finished.is_set()
    assert _row(database).status == "running"
    gated.release.set()
    rest = _events(list(body))
    resp.close()
    deltas = [e["choices"][0]["delta"].get("content") for e in rest[:-3]]
    assert deltas == [" wide", " world"]
    assert rest[-3]["choices"][0]["finish_reason"] == "stop"
    assert rest[-2]["choices"] == [] and rest[-2]["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 0}}
    assert rest[-1] == "[DONE]"
    row = _row(database)
    assert (row.status, row.kind, row.response, row.completion_tokens) == ("completed", "chat", "Hello wide world", 3)
    assert row.messages == [{"role": "user", "content": "Hi"}]


def test_closing_the_stream_stops_the_model_and_records_a_cut_short_call(client, make_user, gated, database):
    headers = make_user("alice")
    resp = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers, buffered=False)
    body = iter(resp.response)
    _first_events(body, 2)
    resp.close()  # what the WSGI server does when the client has gone
    assert gated.cancelled.is_set()
    row = _row(database)
    assert (row.status, row.finish_reason, row.response) == ("cancelled", "cancelled", "Hello")
    assert row.error == "client disconnected"
    assert row.charged is True  # the unit is kept: the model worked for this client
    with database.session() as s:
        assert s.scalar(select(User.used)) == 1


def test_a_failure_mid_stream_is_an_error_event_and_is_refunded(client, make_user, app, database):
    engine = GatedEngine(fail_after_first=True)
    engine.release.set()
    app.extensions["model_api"].engines.install(None, engine)
    headers = make_user("alice")
    resp = client.post("/v1/completions", json={"prompt": "Once", "stream": True}, headers=headers)
    events = _events([resp.data])
    assert events[0]["choices"][0]["text"] == "Hello"
    assert events[1]["error"]["type"] == "server_error" and events[1]["error"]["code"] == "model_error"
    assert events[-1] == "[DONE]"
    row = _row(database)
    assert row.status == "failed" and "accelerator" in row.error and row.charged is False


def test_call_model_stream_uses_the_same_chunks_and_keeps_the_seed_shape_otherwise(client, make_user, gated):
    gated.release.set()
    headers = make_user("alice")
    resp = client.post("/call_model", json={"prompt": "Hi", "stream": True}, headers=headers)
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    events = _events([resp.data])
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text == "Hello wide world"
    assert events[-2]["usage"]["completion_tokens"] == 3  # /call_model always reports usage
    plain = client.post("/call_model", json={"prompt": "Hi"}, headers=headers)
    assert plain.status_code == 201 and plain.json["response"] == "Hello wide world"


def test_v1_errors_use_openai_shape_and_seed_routes_keep_theirs(client, make_user, gated):
    headers = make_user("alice", quota=1)
    r = client.post("/v1/chat/completions", json={**CHAT, "n": 2}, headers=headers)
    assert r.status_code == 400
    assert r.json == {"error": {"message": "Unsupported parameter: 'n' is not supported with this model.",
                                "type": "invalid_request_error", "param": "n", "code": "unsupported_parameter"}}
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                    headers=headers)
    assert r.status_code == 400 and r.json["error"]["param"] == "messages"
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10**6}, headers=headers)
    assert r.status_code == 400 and r.json["error"]["type"] == "invalid_request_error"
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.json["error"]["type"] == "authentication_error"
    assert r.headers["WWW-Authenticate"].startswith("Basic realm=")  # Basic is still advertised
    gated.release.set()
    assert client.post("/v1/completions", json={"prompt": "x"}, headers=headers).status_code == 200
    r = client.post("/v1/completions", json={"prompt": "x"}, headers=headers)
    # a lifetime allowance spent: OpenAI's insufficient_quota, which its SDKs do not retry
    assert r.status_code == 429 and r.json["error"]["type"] == "insufficient_quota"
    assert r.json["error"]["code"] == "insufficient_quota" and r.headers["X-RateLimit-Remaining"] == "0"
    assert r.headers["x-should-retry"] == "false"
    r = client.post("/call_model", json={"prompt": "x"}, headers=headers)
    assert r.status_code == 429 and set(r.json["error"]) == {"code", "message"}  # the seed's shape


def test_api_key_lifecycle_create_use_list_revoke(app, client, make_user, gated, database):
    gated.release.set()
    make_user("alice")
    runner = app.test_cli_runner()
    created = runner.invoke(args=["keys", "create", "alice", "--name", "laptop"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[0]
    assert key.startswith("mk-") and len(key) > 40
    with database.session() as s:
        row = s.scalars(select(ApiKey)).one()
        assert row.key_hash != key and key not in row.key_hash and key.startswith(row.prefix)
        assert row.last_used_at is None
    bearer = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/models", headers=bearer).json["data"][0]["id"] == "gated-model"
    r = client.post("/call_model", json={"prompt": "Hi"}, headers=bearer)  # Bearer works on seed routes too
    assert r.status_code == 201
    assert client.post("/call_model", json={"prompt": "Hi"}, headers=basic("alice")).status_code == 201
    listed = runner.invoke(args=["keys", "list", "alice"])
    assert row.prefix in listed.output and "laptop" in listed.output and key not in listed.output
    revoked = runner.invoke(args=["keys", "revoke", row.prefix])
    assert revoked.exit_code == 0, revoked.output
    r = client.get("/v1/models", headers=bearer)
    assert r.status_code == 401 and r.json["error"]["type"] == "authentication_error"
    assert client.post("/call_model", json={"prompt": "Hi"}, headers=bearer).status_code == 401
    assert runner.invoke(args=["keys", "revoke", "mk-unknown1"]).exit_code != 0
    with database.session() as s:
        assert s.scalars(select(ApiKey)).one().last_used_at is not None


def test_a_deactivated_users_keys_stop_working(app, client, make_user, gated, database):
    make_user("alice")
    key = app.test_cli_runner().invoke(args=["keys", "create", "alice"]).stdout.strip()
    assert app.test_cli_runner().invoke(args=["users", "delete", "alice", "--yes"]).exit_code == 0
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_chat_call_rows_keep_the_conversation_and_show_in_history(client, make_user, gated, database):
    gated.release.set()
    headers = make_user("alice")
    msgs = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 5}, headers=headers)
    assert r.status_code == 200
    body = r.json
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "Hello wide world"
    call_id = uuid.UUID(body["id"].removeprefix("chatcmpl-"))
    with database.session() as s:
        call = s.get(Call, call_id)
        assert call.user.username == "alice"
        assert call.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
        assert call.prompt == "Hi there" and call.params["max_tokens"] == 5
        assert (call.prompt_tokens, call.completion_tokens) == (body["usage"]["prompt_tokens"],
                                                                body["usage"]["completion_tokens"])


def test_usage_reports_prompt_tokens_reused_from_an_earlier_prompt(make_app, make_user):
    """The real batching engine keeps a slot's prompt cells: asking again with the
    same conversation reuses all but the last prompt tokens, and usage says so."""
    app = make_app(model_backend="batching", model_n_parallel=1)
    headers = make_user("alice")
    client = app.test_client()
    body = {"model": "m", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4,
            "temperature": 0}
    first = client.post("/v1/chat/completions", json=body, headers=headers)
    second = client.post("/v1/chat/completions", json=body, headers=headers)
    assert first.status_code == second.status_code == 200
    u1, u2 = first.json["usage"], second.json["usage"]
    assert u1["prompt_tokens"] == u2["prompt_tokens"]
    assert 0 < u2["prompt_tokens_details"]["cached_tokens"] < u2["prompt_tokens"]
    assert u2["prompt_tokens_details"]["cached_tokens"] >= u1["prompt_tokens_details"]["cached_tokens"]
    assert second.json["choices"] == first.json["choices"]  # same greedy text, cache or not
