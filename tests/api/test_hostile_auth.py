"""Hostile credentials (issue 16): an Authorization header built to break the server
is a 401, never a 500; only the Basic and Bearer schemes can authenticate."""

from __future__ import annotations

import base64

import pytest
from sqlalchemy import select

from model_api.models import User

from .test_hostile_input import GENERATION_ROUTES, _error, _nothing_spent


@pytest.fixture
def alice(make_user):
    return make_user("alice")


# --- (5) a NUL byte in the Basic-auth user name --------------------------------------------

def _basic_raw(userpass: bytes, scheme: str = "Basic") -> dict[str, str]:
    return {"Authorization": f"{scheme} " + base64.b64encode(userpass).decode()}


@pytest.mark.parametrize("userpass", [
    b"al\x00ice:correct horse battery",
    b"\x00:correct horse battery",
    b"alice\x00:correct horse battery",
    b"x" * 300 + b":correct horse battery",
], ids=["nul-inside", "only-nul", "nul-suffix", "too-long"])
@pytest.mark.parametrize("method, path", [("post", "/call_model"), ("post", "/v1/chat/completions"),
                                          ("get", "/calls")])
def test_an_impossible_user_name_is_401_not_500(client, alice, database, userpass, method, path):
    r = getattr(client, method)(path, json=GENERATION_ROUTES.get(path, {}), headers=_basic_raw(userpass))
    assert _error(r, 401)["code"] == "unauthorized"
    assert _nothing_spent(database)


# --- (14) only Basic and Bearer authenticate -------------------------------------------------

@pytest.mark.parametrize("scheme", ["Foo", "Digest", "Negotiate", "Token", "Basically"])
def test_credentials_under_another_scheme_do_not_authenticate(client, alice, database, scheme):
    headers = _basic_raw(b"alice:correct horse battery", scheme=scheme)
    r = client.post("/call_model", json={"prompt": "Hi"}, headers=headers)
    assert _error(r, 401)["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Basic ")
    assert _nothing_spent(database)


@pytest.mark.parametrize("scheme", ["Basic", "basic", "BASIC"])
def test_the_basic_scheme_is_case_insensitive(client, make_user, scheme):
    make_user("alice", quota=0)  # quota 0: authenticated is a cheap 429, refused a 401
    r = client.post("/call_model", json={"prompt": "Hi"},
                    headers=_basic_raw(b"alice:correct horse battery", scheme=scheme))
    assert r.status_code == 429, r.json


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(app, client, make_user, database, scheme):
    from model_api.services import api_keys

    make_user("alice", quota=0)
    with database.session() as s:
        key = api_keys.create_key(s, s.scalars(select(User)).one(), "laptop").key
    r = client.post("/call_model", json={"prompt": "Hi"}, headers={"Authorization": f"{scheme} {key}"})
    assert r.status_code == 429, r.json
