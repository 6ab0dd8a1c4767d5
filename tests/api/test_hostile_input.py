"""Hostile clients (issue 16): input built to break the server gets a clear 4xx,
never a 500, a traceback, a stored row or a spent quota unit."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from model_api.models import Call, User

#: the four routes that generate, each with a body that is valid as it stands
GENERATION_ROUTES = {
    "/call_model": {"prompt": "Hi"},
    "/async_call_model": {"prompt": "Hi"},
    "/v1/completions": {"prompt": "Hi"},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}]},
}
SEED_ROUTES = ["/call_model", "/async_call_model"]
OPENAI_ROUTES = ["/v1/completions", "/v1/chat/completions"]


def _body(path: str, **fields) -> dict:
    return {**GENERATION_ROUTES[path], **fields}


def _error(r, status: int) -> dict:
    """The response's error object, after checking status and shape (no traceback)."""
    assert r.status_code == status, r.get_data(as_text=True)
    assert "Traceback" not in r.get_data(as_text=True)
    return r.json["error"]


def _nothing_spent(database) -> bool:
    with database.session() as s:
        return (s.scalar(select(func.count(Call.id))) == 0
                and s.scalar(select(func.coalesce(func.sum(User.used), 0))) == 0)


def _raw_json(value) -> str:
    """JSON text as a client writes it: "\\ud800" stays the six-character escape."""
    return json.dumps(value)


@pytest.fixture
def alice(make_user):
    return make_user("alice")


# --- (6) NUL and lone surrogates in any string field ------------------------------------

UNSTORABLE = {"nul": "a\x00b", "lone-surrogate": "a\ud800b"}


def _with_text(path: str, field: str, text: str) -> dict:
    """A valid body of ``path`` whose ``field`` carries ``text``."""
    if field == "content":
        return _body(path, messages=[{"role": "user", "content": text}])
    if field == "content-part":
        return _body(path, messages=[{"role": "user", "content": [{"type": "text", "text": text}]}])
    if field == "earlier-message":
        return _body(path, messages=[{"role": "system", "content": text}, {"role": "user", "content": "Hi"}])
    if field == "stop-list":
        return _body(path, stop=["ok", text])
    return _body(path, **{field: text})


@pytest.mark.parametrize("text", UNSTORABLE.values(), ids=UNSTORABLE.keys())
@pytest.mark.parametrize("path, field, named", [
    ("/call_model", "prompt", "prompt"),
    ("/async_call_model", "prompt", "prompt"),
    ("/v1/completions", "prompt", "prompt"),
    ("/v1/completions", "stop", "stop"),
    ("/v1/completions", "model", "model"),
    ("/v1/chat/completions", "content", "messages"),
    ("/v1/chat/completions", "content-part", "messages"),
    ("/v1/chat/completions", "earlier-message", "messages"),
    ("/v1/chat/completions", "stop-list", "stop"),
])
def test_unstorable_text_in_any_field_is_a_400_naming_the_field(client, alice, database, path, field, named, text):
    r = client.post(path, data=_raw_json(_with_text(path, field, text)), content_type="application/json",
                    headers=alice)
    err = _error(r, 400)
    assert err["code"] == "invalid_request"
    assert named in err["message"]
    assert _nothing_spent(database)


@pytest.mark.parametrize("path", GENERATION_ROUTES)
def test_unstorable_text_is_a_400_even_for_a_user_out_of_quota(client, make_user, database, path):
    headers = make_user("broke", quota=0)
    text = "a\x00b"
    body = _with_text(path, "content" if path.endswith("chat/completions") else "prompt", text)
    r = client.post(path, data=_raw_json(body), content_type="application/json", headers=headers)
    assert _error(r, 400)["code"] == "invalid_request"

# --- (7) JSON nested deeper than the parser goes -----------------------------------------------

@pytest.mark.parametrize("depth", [10_000, 100_000])
@pytest.mark.parametrize("path", GENERATION_ROUTES)
def test_json_nested_thousands_deep_is_invalid_json(client, alice, database, path, depth):
    body = '{"prompt": ' + "[" * depth + "]" * depth + "}"
    r = client.post(path, data=body, content_type="application/json", headers=alice)
    assert _error(r, 400)["code"] == "invalid_json"
    assert _nothing_spent(database)


# --- (12) JSON types are not coerced, and a 400 lists every bad field -------------------------

@pytest.mark.parametrize("field, value", [
    ("temperature", "0.5"),
    ("temperature", True),
    ("top_p", "0.9"),
    ("max_tokens", "5"),
    ("max_tokens", True),
    ("seed", "1"),
    ("seed", False),
    ("stream", "yes"),
    ("stream", "true"),
    ("stream", 1),
    ("stream", 0),
])
@pytest.mark.parametrize("path", GENERATION_ROUTES)
def test_numbers_and_booleans_must_be_json_numbers_and_booleans(client, alice, database, path, field, value):
    err = _error(client.post(path, json=_body(path, **{field: value}), headers=alice), 400)
    assert field in err["message"]
    assert _nothing_spent(database)


@pytest.mark.parametrize("field, value", [("max_completion_tokens", "5"), ("n", "1"), ("n", True)])
def test_openai_only_numbers_are_strict_too(client, alice, field, value):
    path = "/v1/chat/completions"
    err = _error(client.post(path, json=_body(path, **{field: value}), headers=alice), 400)
    assert field in err["message"]


def test_stream_options_include_usage_must_be_a_boolean(client, alice):
    path = "/v1/chat/completions"
    body = _body(path, stream=True, stream_options={"include_usage": "yes"})
    assert "include_usage" in _error(client.post(path, json=body, headers=alice), 400)["message"]


BAD_FIELDS = {"temperature": "hot", "top_p": 7, "max_tokens": 100_000, "seed": "x", "stream": "yes"}


@pytest.mark.parametrize("path", SEED_ROUTES)
def test_a_400_on_the_seed_routes_lists_every_bad_field(client, alice, path):
    err = _error(client.post(path, json=_body(path, prompt="", **BAD_FIELDS), headers=alice), 400)
    assert set(err["details"]) == {"prompt", *BAD_FIELDS}
    for name in ("prompt", *BAD_FIELDS):
        assert name in err["message"]


@pytest.mark.parametrize("path", OPENAI_ROUTES)
def test_a_400_on_the_openai_routes_names_every_bad_field_in_its_message(client, alice, path):
    err = _error(client.post(path, json=_body(path, **BAD_FIELDS, n=2), headers=alice), 400)
    assert err["param"] in {*BAD_FIELDS, "n"}
    for name in (*BAD_FIELDS, "n"):
        assert name in err["message"]


# --- (2) cheap limits on conversations, before any tokenising ---------------------------------------

def _messages(n: int, content: str = "hi") -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": content} for i in range(n)]


def test_more_messages_than_max_messages_is_a_400_naming_messages(make_app, make_user, database):
    client = make_app(max_messages=4).test_client()
    headers = make_user("alice")
    r = client.post("/v1/chat/completions", json={"messages": _messages(5)}, headers=headers)
    err = _error(r, 400)
    assert err["param"] == "messages" and "at most 4 messages" in err["message"]
    assert _nothing_spent(database)


def test_the_message_count_is_reported_with_the_other_bad_fields(make_app, make_user):
    client = make_app(max_messages=2).test_client()
    r = client.post("/v1/chat/completions", json={"messages": _messages(3), "temperature": "hot"},
                    headers=make_user("alice"))
    message = _error(r, 400)["message"]
    assert "messages" in message and "temperature" in message


def test_a_body_with_thousands_of_messages_is_refused_by_count(client, alice, database):
    r = client.post("/v1/chat/completions", json={"messages": _messages(20_000, "")}, headers=alice)
    assert "at most 256 messages" in _error(r, 400)["message"]
    assert _nothing_spent(database)


def test_max_prompt_chars_counts_all_messages_together(make_app, make_user, database):
    client = make_app(max_prompt_chars=100).test_client()
    headers = make_user("alice")
    # each message alone is short; together they are over the limit
    r = client.post("/v1/chat/completions", json={"messages": _messages(3, "x" * 40)}, headers=headers)
    err = _error(r, 400)  # OpenAI's answer on /v1; the seed routes say 422 prompt_too_long
    assert err["code"] == "string_above_max_length" and "120 characters" in err["message"]
    assert _nothing_spent(database)


@pytest.mark.parametrize("path", ["/call_model", "/async_call_model", "/v1/completions"])
def test_max_prompt_chars_still_limits_a_single_prompt(make_app, make_user, database, path):
    client = make_app(max_prompt_chars=100).test_client()
    r = client.post(path, json=_body(path, prompt="x" * 101), headers=make_user("alice"))
    status, code = (400, "string_above_max_length") if path.startswith("/v1/") else (422, "prompt_too_long")
    assert _error(r, status)["code"] == code
    assert _nothing_spent(database)


def test_a_bad_field_is_reported_before_the_prompt_length(make_app, make_user):
    client = make_app(max_prompt_chars=10).test_client()
    r = client.post("/call_model", json={"prompt": "x" * 11, "temperature": "hot"}, headers=make_user("alice"))
    assert "temperature" in _error(r, 400)["message"]


@pytest.mark.parametrize("path", GENERATION_ROUTES)
def test_max_tokens_over_the_cap_is_a_field_error(make_app, make_user, path):
    client = make_app(max_tokens_cap=16).test_client()
    r = client.post(path, json=_body(path, max_tokens=17), headers=make_user("alice"))
    assert "max_tokens: must be <= 16" in _error(r, 400)["message"]
