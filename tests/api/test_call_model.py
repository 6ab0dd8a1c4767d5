"""/call_model through the HTTP test client with the real SmolLM2 model."""

from sqlalchemy import func, select

from model_api.models import Call, User

from ..conftest import basic


def test_call_model_returns_201_with_the_models_reply(client, make_user, database):
    headers = make_user("alice")
    r = client.post("/call_model", json={"prompt": "What is the capital of France?", "max_tokens": 24,
                                         "temperature": 0}, headers=headers)
    assert r.status_code == 201, r.json
    body = r.json
    assert isinstance(body["response"], str) and body["response"].strip()
    assert body["usage"]["completion_tokens"] >= 1
    assert body["usage"]["prompt_tokens"] > 5  # chat template + a multi-token prompt
    assert body["model"].startswith("SmolLM2")
    assert r.headers["X-RateLimit-Limit"] == "3"
    assert r.headers["X-RateLimit-Remaining"] == "2"
    with database.session() as s:
        call = s.get(Call, __import__("uuid").UUID(body["id"]))
        assert call.prompt == "What is the capital of France?"
        assert call.response == body["response"]
        assert call.status == "completed" and call.kind == "sync"
        assert call.completion_tokens == body["usage"]["completion_tokens"]
        assert call.finished_at is not None and call.started_at is not None


def test_greedy_generation_is_deterministic_and_respects_max_tokens(client, make_user):
    headers = make_user("alice", quota=10)
    payload = {"prompt": "Write a long story about a dragon who learns to read.", "max_tokens": 12, "temperature": 0}
    a = client.post("/call_model", json=payload, headers=headers).json
    b = client.post("/call_model", json=payload, headers=headers).json
    assert a["response"] == b["response"]
    assert a["usage"]["completion_tokens"] <= 12
    assert a["finish_reason"] == "length"


def test_seeded_sampling_is_reproducible(client, make_user):
    headers = make_user("alice", quota=10)
    payload = {"prompt": "Name a colour.", "max_tokens": 8, "temperature": 1.0, "seed": 1234}
    a = client.post("/call_model", json=payload, headers=headers).json["response"]
    b = client.post("/call_model", json=payload, headers=headers).json["response"]
    assert a == b


def test_fourth_call_is_refused_with_429_and_writes_no_row(client, make_user, database):
    headers = make_user("alice")
    for expected_left in ("2", "1", "0"):
        r = client.post("/call_model", json={"prompt": "Hi", "max_tokens": 2}, headers=headers)
        assert r.status_code == 201
        assert r.headers["X-RateLimit-Remaining"] == expected_left
    r = client.post("/call_model", json={"prompt": "Hi", "max_tokens": 2}, headers=headers)
    assert r.status_code == 429
    assert r.json["error"]["code"] == "quota_exceeded"
    assert r.headers["X-RateLimit-Remaining"] == "0"
    assert "Retry-After" not in r.headers  # lifetime allowance: no window to wait for
    with database.session() as s:
        assert s.scalar(select(func.count(Call.id))) == 3


def test_windowed_quota_says_when_to_retry(make_app, make_user):
    client = make_app(quota_window_seconds=3600, default_quota=1).test_client()
    headers = make_user("alice")
    assert client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=headers).status_code == 201
    r = client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=headers)
    assert r.status_code == 429
    assert 3500 < int(r.headers["Retry-After"]) <= 3600


def test_quota_is_per_user(client, make_user):
    a, b = make_user("alice", quota=1), make_user("bob", quota=1)
    assert client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=a).status_code == 201
    assert client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=a).status_code == 429
    assert client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=b).status_code == 201


def test_prompt_longer_than_context_is_422_and_free(client, make_user, database):
    headers = make_user("alice")
    r = client.post("/call_model", json={"prompt": "hello " * 3000, "max_tokens": 1}, headers=headers)
    assert r.status_code == 422
    assert r.json["error"]["code"] == "prompt_too_long"
    assert r.json["error"]["details"]["prompt_tokens"] > r.json["error"]["details"]["context_size"]
    with database.session() as s:
        assert s.scalar(select(func.count(Call.id))) == 0
        assert s.scalar(select(User.used)) == 0


def test_a_model_failure_is_500_json_and_refunds(client, make_user, database, monkeypatch, app):
    from model_api.engine.base import EngineError, Generation

    headers = make_user("alice")
    engine = app.extensions["model_api"].engine

    class Broken(Generation):  # fails once the call is admitted and charged
        def __next__(self):
            raise EngineError("the GPU caught fire")

    monkeypatch.setattr(engine, "stream", lambda *a, **k: Broken())  # the engine is the external part here
    r = client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=headers)
    assert r.status_code == 500
    assert r.json["error"]["code"] == "model_error"
    assert "Traceback" not in r.get_data(as_text=True)
    with database.session() as s:
        call = s.scalars(select(Call)).one()
        assert call.status == "failed" and "fire" in call.error
        assert call.charged is False
        assert s.scalar(select(User.used)) == 0


def test_wrong_password_is_401_with_challenge(client, make_user):
    make_user("alice")
    r = client.post("/call_model", json={"prompt": "Hi"}, headers=basic("alice", "wrong password"))
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic realm=")
    assert r.json["error"]["code"] == "unauthorized"
