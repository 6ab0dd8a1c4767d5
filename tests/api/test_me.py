"""/me: a customer sees their own quota, usage and keys, and never anyone else's."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from model_api.models import AdminEvent, Call

from ..conftest import basic


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_me_shows_the_quota_falling_with_each_call(client, make_user):
    alice = make_user("alice", quota=2)
    assert client.get("/me", headers=alice).json == {
        "username": "alice", "admin": False, "models": None,
        "quota": {"limit": 2, "used": 0, "remaining": 2, "window_seconds": None, "renews_at": None}}
    client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=alice)
    assert client.get("/me", headers=alice).json["quota"]["remaining"] == 1
    assert client.get("/me").status_code == 401


def test_a_windowed_quota_says_when_it_renews(make_app, make_user):
    client = make_app(quota_window_seconds=3600).test_client()
    alice = make_user("alice", quota=2)
    client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=alice)
    quota = client.get("/me", headers=alice).json["quota"]
    assert quota["window_seconds"] == 3600 and quota["renews_at"].endswith("+00:00")


def test_my_usage_counts_only_my_calls(client, make_user, database):
    alice, bob = make_user("alice", quota=5), make_user("bob", quota=5)
    for headers in (alice, alice, bob):
        client.post("/call_model", json={"prompt": "Hi", "max_tokens": 2}, headers=headers)
    rows = client.get("/me/usage?group_by=model", headers=alice).json["rows"]
    with database.session() as s:
        mine = list(s.scalars(select(Call).join(Call.user).where(Call.user.has(username="alice"))))
    assert sum(r["calls"] for r in rows) == len(mine) == 2
    assert sum(r["completion_tokens"] for r in rows) == sum(c.completion_tokens for c in mine)
    assert client.get("/me/usage?group_by=user", headers=alice).status_code == 400  # no peeking at others
    assert client.get("/me/usage?format=csv", headers=alice).mimetype == "text/csv"


def test_my_keys_create_show_once_and_revoke(client, make_user, database):
    alice = make_user("alice")
    r = client.post("/me/keys", json={"name": "laptop"}, headers=alice)
    assert r.status_code == 201 and r.json["key"].startswith("mk-") and r.json["user"] == "alice"
    listed = client.get("/me/keys", headers=alice).json["keys"]
    assert [k["name"] for k in listed] == ["laptop"] and "key" not in listed[0]
    assert client.get("/me", headers=bearer(r.json["key"])).json["username"] == "alice"
    assert client.delete(f"/me/keys/{r.json['id']}", headers=alice).json["state"] == "revoked"
    assert client.get("/me", headers=bearer(r.json["key"])).status_code == 401
    assert client.get("/me/keys", headers=alice).json["keys"] == []
    with database.session() as s:
        assert [e.action for e in s.scalars(select(AdminEvent).order_by(AdminEvent.id))] == ["key.create", "key.revoke"]


def test_another_customers_key_is_answered_like_a_missing_one(client, make_user):
    alice, bob = make_user("alice"), make_user("bob")
    bobs = client.post("/me/keys", json={}, headers=bob).json
    r = client.delete(f"/me/keys/{bobs['id']}", headers=alice)
    assert r.status_code == 404
    missing = client.delete("/me/keys/999999", headers=alice)
    assert r.json["error"]["code"] == missing.json["error"]["code"] == "not_found"
    assert "bob" not in r.get_data(as_text=True)
    assert client.get("/me", headers=bearer(bobs["key"])).status_code == 200  # still works
    assert client.get("/me/keys", headers=alice).json["keys"] == []


@pytest.mark.parametrize(("body", "field", "status"), [
    ({"name": "x\x00"}, "name", 400),
    ({"name": 5}, "name", 400),
    ({"expires_at": "not a date"}, "expires_at", 400),
    ({"models": "all"}, "models", 400),
    ({"models": ["nope"]}, "models", 404),
])
def test_bad_key_bodies(client, make_user, body, field, status):
    r = client.post("/me/keys", json=body, headers=make_user("alice"))
    assert r.status_code == status and field in r.json["error"]["details"], r.json


def test_a_key_limited_to_some_models_cannot_mint_a_wider_key(client, make_user, app):
    alice = make_user("alice")
    model = next(iter(app.extensions["model_api"].models.names.values()))
    narrow = client.post("/me/keys", json={"models": [model]}, headers=alice).json
    assert narrow["models"] == [model]
    child = client.post("/me/keys", json={}, headers=bearer(narrow["key"]))
    assert child.status_code == 201 and child.json["models"] == [model]
    assert client.post("/me/keys", json={}, headers=basic("alice")).json["models"] is None


@pytest.mark.parametrize("key_id", ["0", "2147483648", "99999999999999999999"])
def test_key_ids_that_cannot_exist_are_404(client, make_user, key_id):
    assert client.delete(f"/me/keys/{key_id}", headers=make_user("alice")).status_code == 404
