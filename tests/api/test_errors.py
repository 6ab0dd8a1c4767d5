"""Every rejected request: right status, one JSON error shape, no quota used, no row."""

import pytest
from sqlalchemy import func, select

from model_api.models import Call, User

from ..conftest import basic


@pytest.fixture
def alice(make_user):
    return make_user("alice")


def _assert_nothing_spent(database):
    with database.session() as s:
        assert s.scalar(select(func.count(Call.id))) == 0
        assert s.scalar(select(func.coalesce(func.sum(User.used), 0))) == 0


def _error(r, status):
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.is_json
    err = r.json["error"]
    assert isinstance(err["code"], str) and isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.get_data(as_text=True)
    return err


@pytest.mark.parametrize(
    "body, content_type, field",
    [
        ('{"prompt": "Hi"', "application/json", None),  # truncated JSON
        ("not json at all", "application/json", None),
        ('["Hi"]', "application/json", "body"),  # not an object
        ('"Hi"', "application/json", "body"),
        ("{}", "application/json", "prompt"),  # missing
        ('{"prompt": 42}', "application/json", "prompt"),  # not a string
        ('{"prompt": null}', "application/json", "prompt"),
        ('{"prompt": ""}', "application/json", "prompt"),  # empty
        ('{"prompt": "   "}', "application/json", "prompt"),  # blank
        ('{"prompt": "Hi", "max_tokens": "10"}', "application/json", "max_tokens"),
        ('{"prompt": "Hi", "max_tokens": 0}', "application/json", "max_tokens"),
        ('{"prompt": "Hi", "max_tokens": 1.5}', "application/json", "max_tokens"),
        ('{"prompt": "Hi", "max_tokens": 100000}', "application/json", "max_tokens"),  # over the cap
        ('{"prompt": "Hi", "temperature": -1}', "application/json", "temperature"),
        ('{"prompt": "Hi", "temperature": "hot"}', "application/json", "temperature"),
        ('{"prompt": "Hi", "top_p": 0}', "application/json", "top_p"),
        ('{"prompt": "Hi", "top_p": 1.5}', "application/json", "top_p"),
        ('{"prompt": "Hi", "seed": "abc"}', "application/json", "seed"),
    ],
)
@pytest.mark.parametrize("path", ["/call_model", "/async_call_model"])
def test_bad_bodies_are_400(client, alice, database, path, body, content_type, field):
    r = client.post(path, data=body, content_type=content_type, headers=alice)
    err = _error(r, 400)
    if field is not None:
        assert field in err["message"]
    _assert_nothing_spent(database)


def test_body_over_the_limit_is_413(client, alice, database):
    r = client.post("/call_model", json={"prompt": "x" * (1024 * 1024 + 10)}, headers=alice)
    _error(r, 413)
    _assert_nothing_spent(database)


def test_prompt_over_the_character_limit_is_422(make_app, make_user, database):
    client = make_app(max_prompt_chars=100).test_client()
    r = client.post("/call_model", json={"prompt": "x" * 101}, headers=make_user("alice"))
    assert _error(r, 422)["code"] == "prompt_too_long"
    _assert_nothing_spent(database)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic"},
        {"Authorization": "Basic !!!notbase64"},
        {"Authorization": "Bearer abc"},
        basic("alice", "wrong password"),
        basic("nobody", "whatever123"),
        basic("", ""),
    ],
    ids=["missing", "empty-basic", "bad-base64", "other-scheme", "wrong-password", "unknown-user", "empty-creds"],
)
@pytest.mark.parametrize("method, path", [("post", "/call_model"), ("post", "/async_call_model"),
                                          ("get", "/async_call_status?job_id=6fde421b-5079-4c22-ad78-e65a6fefaaaf")])
def test_bad_credentials_are_401_with_a_basic_challenge(client, alice, database, headers, method, path):
    r = getattr(client, method)(path, json={"prompt": "Hi"}, headers=headers)
    err = _error(r, 401)
    assert err["code"] == "unauthorized"
    # a rejected API key is challenged for a key (RFC 6750); everything else for Basic
    scheme = "Bearer" if headers.get("Authorization", "").startswith("Bearer") else "Basic"
    assert r.headers["WWW-Authenticate"].startswith(f'{scheme} realm="')
    _assert_nothing_spent(database)


def test_deleted_user_cannot_sign_in(client, make_user, database):
    headers = make_user("alice")
    with database.session() as s:
        s.scalars(select(User)).one().is_active = False
    _error(client.post("/call_model", json={"prompt": "Hi"}, headers=headers), 401)


@pytest.mark.parametrize("method, path, allowed", [
    ("get", "/call_model", "POST"),
    ("put", "/async_call_model", "POST"),
    ("post", "/async_call_status", "GET"),
    ("delete", "/health_check", "GET"),
])
def test_wrong_method_is_405_with_allow(client, method, path, allowed):
    r = getattr(client, method)(path)
    _error(r, 405)
    assert allowed in r.headers["Allow"]


def test_unknown_path_is_404_json(client):
    assert _error(client.get("/nope"), 404)["code"] == "not_found"


@pytest.mark.parametrize("query", ["", "?job_id=", "?job_id=not-a-uuid", "?job_id=123"])
def test_status_needs_a_uuid(client, alice, query):
    _error(client.get("/async_call_status" + query, headers=alice), 400)


def test_password_change_invalidates_cached_credentials(client, make_user, database):
    from model_api.services.auth import set_password

    headers = make_user("alice", quota=0)  # quota 0: every call is a cheap 429 after auth
    assert client.post("/call_model", json={"prompt": "Hi"}, headers=headers).status_code == 429
    with database.session() as s:
        set_password(s, "alice", "a brand new password")
    _error(client.post("/call_model", json={"prompt": "Hi"}, headers=headers), 401)
    assert client.post("/call_model", json={"prompt": "Hi"},
                       headers=basic("alice", "a brand new password")).status_code == 429


@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded", "text/plain"])
def test_undecodable_json_says_so_whatever_the_content_type(client, alice, content_type):
    r = client.post("/call_model", data='{"prompt": "Hi"', content_type=content_type, headers=alice)
    assert _error(r, 400)["code"] == "invalid_json"


def test_json_sent_as_form_encoded_is_read_as_json(client, alice):
    # curl -d '{"prompt": ""}' sends application/x-www-form-urlencoded
    r = client.post("/call_model", data='{"prompt": ""}', content_type="application/x-www-form-urlencoded",
                    headers=alice)
    assert "prompt" in _error(r, 400)["message"]
