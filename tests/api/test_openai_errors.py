"""OpenAI's error semantics on /v1 (the seed routes keep theirs): quota refusals
as insufficient_quota or rate_limit_exceeded, parameters we cannot honour named
in a 400 instead of silently dropped. No model runs: every case is refused first."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from model_api.db import utcnow
from model_api.models import Call, User

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def spend_quota(database, name: str, *, limit: int, used: int, window_started=None) -> None:
    with database.session() as s:
        s.execute(update(User).where(User.username == name).values(quota=limit, used=used,
                                                                    window_started_at=window_started))


def no_rows(database) -> bool:
    with database.session() as s:
        return s.scalars(select(Call)).all() == []


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT),
                                        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
                                        ("/v1/chat/completions", {**CHAT, "stream": True})])
def test_a_spent_lifetime_quota_is_insufficient_quota_and_not_worth_retrying(client, make_user, database,
                                                                              path, body):
    headers = make_user("alice")
    spend_quota(database, "alice", limit=1, used=1)
    r = client.post(path, json=body, headers=headers)
    assert r.status_code == 429
    assert r.json["error"] == {"message": "You exceeded your current quota: no model calls left for this user.",
                               "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}
    assert r.headers["x-should-retry"] == "false" and "Retry-After" not in r.headers
    assert no_rows(database)


def test_a_spent_renewing_window_is_rate_limit_exceeded_with_retry_after(make_app, make_user, database):
    client = make_app(quota_window_seconds=3600).test_client()
    headers = make_user("alice")
    spend_quota(database, "alice", limit=2, used=2, window_started=utcnow())
    r = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == 429 and r.json["error"]["code"] == "rate_limit_exceeded"
    assert r.json["error"]["type"] == "rate_limit_error"
    assert 3590 <= int(r.headers["Retry-After"]) <= 3600 and "x-should-retry" not in r.headers
    seed = client.post("/call_model", json={"prompt": "Hi"}, headers=headers)
    assert seed.status_code == 429 and seed.json["error"]["code"] == "quota_exceeded"  # the seed's code stays


@pytest.mark.parametrize("field, value", [
    ("n", 2), ("logprobs", True), ("top_logprobs", 3), ("logit_bias", {"50256": -100}),
    ("presence_penalty", 0.5), ("frequency_penalty", -1), ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]), ("functions", [{"name": "f"}]), ("prediction", {"type": "content"}),
    ("reasoning_effort", "high"),
])
def test_a_parameter_we_cannot_honour_is_a_400_naming_it(client, make_user, database, field, value):
    headers = make_user("alice")
    r = client.post("/v1/chat/completions", json={**CHAT, field: value}, headers=headers)
    assert r.status_code == 400, r.json
    assert r.json["error"] == {"message": f"Unsupported parameter: '{field}' is not supported with this model.",
                               "type": "invalid_request_error", "param": field, "code": "unsupported_parameter"}
    assert no_rows(database)


@pytest.mark.parametrize("field, value", [("echo", True), ("best_of", 3), ("suffix", "end"), ("logprobs", 2),
                                          ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("tool_choice", "required")])
def test_completions_refuse_their_own_unsupported_parameters(client, make_user, field, value):
    r = client.post("/v1/completions", json={"prompt": "Hi", field: value}, headers=make_user("alice"))
    assert r.status_code == 400 and r.json["error"]["param"] == field


def test_an_over_long_string_is_a_400_on_v1_and_a_422_on_the_seed_routes(make_app, make_user):
    client = make_app(max_prompt_chars=10).test_client()
    headers = make_user("alice")
    r = client.post("/v1/completions", json={"prompt": "x" * 11}, headers=headers)
    assert r.status_code == 400 and r.json["error"]["code"] == "string_above_max_length"
    r = client.post("/call_model", json={"prompt": "x" * 11}, headers=headers)
    assert r.status_code == 422 and r.json["error"]["code"] == "prompt_too_long"
