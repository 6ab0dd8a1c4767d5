"""/admin: only admins reach it; every change is audited; the usage report adds up."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from model_api.models import AdminEvent, ApiKey, Call, User

from ..conftest import basic

ADMIN_ROUTES = [
    ("get", "/admin/users", None),
    ("post", "/admin/users", {"username": "mallory2", "password": "a long password"}),
    ("patch", "/admin/users/alice", {"quota": 1000}),
    ("get", "/admin/keys", None),
    ("post", "/admin/keys", {"user": "mallory"}),
    ("delete", "/admin/keys/1", None),
    ("get", "/admin/usage?group_by=user", None),
    ("get", "/admin/calls", None),
    ("get", "/admin/events", None),
    ("post", "/admin/users", {"bogus": "\x00"}),  # even a bad body: 403 before it is read
    ("patch", "/admin/users/nobody", {}),
]


@pytest.fixture
def admin(make_user, database):
    headers = make_user("root", quota=100)
    with database.session() as s:
        s.execute(update(User).where(User.username == "root").values(is_admin=True))
    return headers


def key_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def events(database, action: str | None = None) -> list[AdminEvent]:
    with database.session() as s:
        q = select(AdminEvent).order_by(AdminEvent.id)
        if action:
            q = q.where(AdminEvent.action == action)
        return list(s.scalars(q))


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_a_customer_gets_a_bare_403_on_every_admin_route(client, make_user, admin, method, path, body):
    mallory = make_user("mallory")
    r = getattr(client, method)(path, json=body, headers=mallory)
    assert r.status_code == 403, r.json
    assert r.json == {"error": {"code": "forbidden", "message": "forbidden"}}
    assert getattr(client, method)(path, json=body).status_code == 401


def test_a_customer_with_an_api_key_is_refused_too(client, make_user, admin):
    make_user("mallory")
    key = client.post("/me/keys", json={}, headers=basic("mallory")).json["key"]
    assert client.get("/admin/users", headers=key_headers(key)).status_code == 403


def test_an_admin_creates_lists_and_changes_users_and_each_change_is_audited(client, admin, database):
    r = client.post("/admin/users", json={"username": "acme", "password": "a long password", "quota": 5},
                    headers={**admin, "X-Request-ID": "req-create-acme"})
    assert r.status_code == 201, r.json
    assert r.json["quota"] == {"limit": 5, "used": 0, "remaining": 5, "custom": True}
    assert r.json["admin"] is False and r.json["active"] is True
    assert client.post("/call_model", json={"prompt": "Hi", "max_tokens": 2},
                       headers=basic("acme", "a long password")).status_code == 201

    page = client.get("/admin/users?limit=1", headers=admin).json
    assert [u["username"] for u in page["users"]] == ["acme"] and page["next_after"] == "acme"
    acme = page["users"][0]
    assert acme["quota"]["used"] == 1 and acme["quota"]["remaining"] == 4 and acme["calls"] == 1
    assert acme["tokens"] > 0 and acme["last_call_at"].endswith("+00:00")
    assert [u["username"] for u in client.get("/admin/users?after=acme", headers=admin).json["users"]] == ["root"]

    r = client.patch("/admin/users/acme", json={"quota": 9, "reset_usage": True, "password": "another long one"},
                     headers=admin)
    assert r.status_code == 200 and r.json["quota"] == {"limit": 9, "used": 0, "remaining": 9, "custom": True}
    assert client.get("/me", headers=basic("acme", "another long one")).status_code == 200
    assert client.get("/me", headers=basic("acme", "a long password")).status_code == 401
    assert client.patch("/admin/users/acme", json={"active": False}, headers=admin).json["active"] is False
    assert client.get("/me", headers=basic("acme", "another long one")).status_code == 401

    create, update_, deactivate = events(database)
    assert (create.action, create.target, create.request_id) == ("user.create", "acme", "req-create-acme")
    assert create.actor_id is not None and create.detail == {"quota": 5}
    assert update_.detail == {"quota": 9, "reset_usage": True, "password": "changed"}
    assert "another long one" not in str(update_.detail)
    assert deactivate.detail == {"active": False}
    log = client.get("/admin/events", headers=admin).json["events"]
    assert [e["action"] for e in log] == ["user.update", "user.update", "user.create"]
    assert log[-1]["actor"] == "root" and log[-1]["request_id"] == "req-create-acme"


@pytest.mark.parametrize(("body", "field"), [
    ({"username": "x", "password": "short"}, "password"),
    ({"username": "", "password": "a long password"}, "username"),
    ({"username": "a\x00b", "password": "a long password"}, "username"),
    ({"username": "\ud800", "password": "a long password"}, "username"),
    ({"username": "x", "password": "a long password", "quota": -1}, "quota"),
    ({"username": "x", "password": "a long password", "quota": 10**12}, "quota"),
    ({"username": "x", "password": "a long password", "quota": "5"}, "quota"),
    ({"username": "x", "password": "a long password", "admin": "yes"}, "admin"),
    ({"password": "a long password"}, "username"),
])
def test_bad_user_bodies_are_400_naming_the_field(client, admin, body, field):
    r = client.post("/admin/users", json=body, headers=admin)
    assert r.status_code == 400, r.json
    assert field in r.json["error"]["details"]


def test_user_conflicts_and_missing_users(client, admin):
    body = {"username": "acme", "password": "a long password"}
    assert client.post("/admin/users", json=body, headers=admin).status_code == 201
    r = client.post("/admin/users", json=body, headers=admin)
    assert r.status_code == 409 and "already exists" in r.json["error"]["message"]
    assert client.patch("/admin/users/nobody", json={"quota": 1}, headers=admin).status_code == 404
    assert client.patch("/admin/users/acme", json={}, headers=admin).json["username"] == "acme"  # a no-op
    # an admin cannot lock themselves out
    assert client.patch("/admin/users/root", json={"active": False}, headers=admin).status_code == 409
    assert client.patch("/admin/users/root", json={"admin": False}, headers=admin).status_code == 409


def test_a_demoted_admin_loses_access_with_the_next_request(client, admin, make_user):
    make_user("second")
    assert client.patch("/admin/users/second", json={"admin": True}, headers=admin).status_code == 200
    assert client.get("/admin/users", headers=basic("second")).status_code == 200
    assert client.patch("/admin/users/second", json={"admin": False}, headers=admin).status_code == 200
    assert client.get("/admin/users", headers=basic("second")).status_code == 403


def test_keys_are_created_shown_once_listed_revoked_and_expire(client, admin, make_user, database):
    make_user("acme")
    r = client.post("/admin/keys", json={"user": "acme", "name": "billing"}, headers=admin)
    assert r.status_code == 201, r.json
    key, key_id = r.json["key"], r.json["id"]
    assert key.startswith("mk-") and r.json["state"] == "active" and r.json["user"] == "acme"
    listed = client.get("/admin/keys?user=acme", headers=admin).json["keys"]
    assert [k["id"] for k in listed] == [key_id] and "key" not in listed[0]
    assert client.get("/me", headers=key_headers(key)).json["username"] == "acme"

    assert client.delete(f"/admin/keys/{key_id}", headers=admin).json["state"] == "revoked"
    assert client.get("/me", headers=key_headers(key)).status_code == 401
    assert client.get("/admin/keys?user=acme", headers=admin).json["keys"] == []
    assert len(client.get("/admin/keys?user=acme&revoked=true", headers=admin).json["keys"]) == 1

    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    r = client.post("/admin/keys", json={"user": "acme", "expires_at": soon}, headers=admin)
    assert r.status_code == 201 and r.json["expires_at"]
    assert client.get("/me", headers=key_headers(r.json["key"])).status_code == 200
    with database.session() as s:  # time passes
        s.execute(update(ApiKey).where(ApiKey.id == r.json["id"])
                  .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert client.get("/me", headers=key_headers(r.json["key"])).status_code == 401
    assert client.get("/admin/keys?user=acme", headers=admin).json["keys"][0]["state"] == "expired"
    assert [e.action for e in events(database)] == ["key.create", "key.revoke", "key.create"]


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"user": "acme", "expires_at": "2001-01-01"}, 400, None),
    ({"user": "acme", "expires_at": "tomorrow"}, 400, "expires_at"),
    ({"user": "acme", "expires_at": 5}, 400, "expires_at"),
    ({"user": "acme", "models": ["no-such-model"]}, 404, "models"),
    ({"user": "acme", "name": "x" * 101}, 400, "name"),
    ({"user": "nobody"}, 404, None),
    ({}, 400, "user"),
])
def test_bad_key_requests(client, admin, make_user, body, status, field):
    make_user("acme")
    r = client.post("/admin/keys", json=body, headers=admin)
    assert r.status_code == status, r.json
    if field:
        assert field in r.json["error"]["details"]


def test_revoking_a_missing_key_is_404(client, admin):
    assert client.delete("/admin/keys/999999", headers=admin).status_code == 404
    assert client.delete("/admin/keys/abc", headers=admin).status_code == 404


def test_admin_calls_are_filtered_and_cursor_paginated(client, admin, make_user):
    alice, bob = make_user("alice", quota=10), make_user("bob")
    for p in ("one", "two", "three"):
        client.post("/call_model", json={"prompt": p, "max_tokens": 1}, headers=alice)
    client.post("/call_model", json={"prompt": "bob's", "max_tokens": 1}, headers=bob)
    page = client.get("/admin/calls?user=alice&limit=2", headers=admin).json
    assert [c["prompt"] for c in page["calls"]] == ["three", "two"]
    rest = client.get(f"/admin/calls?user=alice&limit=2&before={page['next_before']}", headers=admin).json
    assert [c["prompt"] for c in rest["calls"]] == ["one"] and rest["next_before"] is None
    assert len(client.get("/admin/calls?status=completed", headers=admin).json["calls"]) == 4
    assert client.get("/admin/calls?status=failed", headers=admin).json["calls"] == []
    assert client.get("/admin/calls?status=bogus", headers=admin).status_code == 400
    assert client.get("/admin/calls?before=nope", headers=admin).status_code == 400
    assert client.get("/admin/calls?since=yesterday", headers=admin).status_code == 400
    assert client.get("/admin/calls?user=nobody", headers=admin).status_code == 404


def test_usage_report_equals_what_the_calls_produced(client, admin, make_user, database):
    alice, bob = make_user("alice", quota=10), make_user("bob", quota=10)
    key = client.post("/me/keys", json={"name": "app"}, headers=alice).json
    for headers in (alice, alice, key_headers(key["key"]), bob):
        assert client.post("/call_model", json={"prompt": "Count to three", "max_tokens": 3},
                           headers=headers).status_code == 201
    with database.session() as s:  # one call failed and was refunded
        s.execute(update(Call).where(Call.id == s.scalar(select(Call.id).join(User).where(User.username == "bob")))
                  .values(status="failed", charged=False))
        expected = {name: (n, p, c) for name, n, p, c in s.execute(
            select(User.username, func.count(), func.sum(Call.prompt_tokens), func.sum(Call.completion_tokens))
            .join(User).group_by(User.username))}

    by_user = client.get("/admin/usage?group_by=user", headers=admin).json
    got = {r["label"]: (r["calls"], r["prompt_tokens"], r["completion_tokens"]) for r in by_user["rows"]}
    assert got == expected
    bob_row = next(r for r in by_user["rows"] if r["label"] == "bob")
    assert (bob_row["failed"], bob_row["refunded"], bob_row["completed"]) == (1, 1, 0)
    assert by_user["totals"]["calls"] == 4 and all(r["model_seconds"] >= 0 for r in by_user["rows"])

    by_key = {r["label"]: r["calls"] for r in client.get("/admin/usage?group_by=key", headers=admin).json["rows"]}
    assert by_key == {"(no key: password)": 3, f"{key['prefix']} (app)": 1}
    today = datetime.now(UTC).date().isoformat()
    assert [(r["group"], r["calls"]) for r in
            client.get("/admin/usage?group_by=day", headers=admin).json["rows"]] == [(today, 4)]
    assert sum(r["calls"] for r in client.get("/admin/usage?group_by=model", headers=admin).json["rows"]) == 4
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert client.get(f"/admin/usage?since={tomorrow}", headers=admin).json["rows"] == []
    assert client.get(f"/admin/usage?until={today}", headers=admin).json["rows"] == []


def test_usage_as_csv_for_billing(client, admin, make_user, database):
    make_user("=cmd|' /C calc'!A0", quota=5)  # a formula for a name must not run in a spreadsheet
    assert client.post("/call_model", json={"prompt": "Hi", "max_tokens": 2},
                       headers=basic("=cmd|' /C calc'!A0")).status_code == 201
    r = client.get("/admin/usage?group_by=user&format=csv", headers=admin)
    assert r.status_code == 200 and r.mimetype == "text/csv"
    assert "attachment" in r.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    assert rows[0]["label"] == "'=cmd|' /C calc'!A0" and rows[0]["calls"] == "1"
    assert list(rows[0]) == ["user", "label", "calls", "completed", "failed", "refunded", "prompt_tokens",
                             "completion_tokens", "model_seconds"]


@pytest.mark.parametrize("query", ["group_by=week", "format=xml", "since=2026-13-01", "since=" + "9" * 50,
                                   "since=%00", "since=0001-01-01T00:00:00%2B01:00"])
def test_bad_usage_queries_are_400(client, admin, query):
    assert client.get(f"/admin/usage?{query}", headers=admin).status_code == 400


@pytest.mark.parametrize("query", ["since=2026-11-02&until=2026-11-01", "since=0001-01-01", "until=9999-12-31",
                                   "since=9999-12-31T23:59:59"])
def test_empty_or_extreme_ranges_are_answered(client, admin, query):
    r = client.get(f"/admin/usage?group_by=day&{query}", headers=admin)
    assert r.status_code == 200 and r.json["rows"] == []


def test_admin_routes_are_in_the_openapi_document(client):
    paths = client.get("/openapi.json").json["paths"]
    for path in ("/admin/users", "/admin/users/{username}", "/admin/keys", "/admin/keys/{key_id}",
                 "/admin/usage", "/admin/calls", "/admin/events", "/me", "/me/usage", "/me/keys", "/me/keys/{key_id}"):
        assert path in paths, path


def test_rolled_up_days_give_the_same_report_as_the_rows(client, admin, make_user, database, app):
    """Days that ended are read from usage_daily once rolled up: the figures do not change."""
    from model_api.services import usage

    alice, bob = make_user("alice", quota=10), make_user("bob", quota=10)
    key = client.post("/me/keys", json={}, headers=alice).json["key"]
    for headers in (alice, alice, {"Authorization": f"Bearer {key}"}, bob, bob):
        assert client.post("/call_model", json={"prompt": "Hi", "max_tokens": 2}, headers=headers).status_code == 201
    with database.session() as s:  # spread the calls over past days: 5, 5, 4 days ago, 3 days ago, today
        # shifted in Python, not in SQL: SQLite has no datetime arithmetic and would store a number
        calls = list(s.scalars(select(Call).order_by(Call.created_at)))
        for call, days in zip(calls, (5, 5, 4, 3, 0), strict=True):
            for column in ("created_at", "started_at", "finished_at"):
                setattr(call, column, getattr(call, column) - timedelta(days=days))
        calls[3].status = "running"  # 3 days ago: still open
    queries = [f"group_by={g}{r}" for g in ("user", "key", "model", "day")
               for r in ("", f"&since={(datetime.now(UTC) - timedelta(days=4, hours=12)).isoformat()}",
                         f"&since={(datetime.now(UTC) - timedelta(days=4)).date()}&until={datetime.now(UTC).date()}")]

    def reports():
        figures = {q: client.get("/admin/usage?" + q.replace("+", "%2B"), headers=admin).json["rows"] for q in queries}
        figures["users"] = client.get("/admin/users", headers=admin).json["users"]
        return figures

    before = reports()
    # 5 and 4 days ago, and 2 days ago (no calls); 3 days ago is still running, today not over
    assert usage.roll_up(app.extensions["model_api"].db) == 3
    assert usage.roll_up(app.extensions["model_api"].db) == 0
    assert reports() == before
    assert sum(r["calls"] for r in before["group_by=day"]) == 5
    assert {u["username"]: u["calls"] for u in before["users"]} == {"alice": 3, "bob": 2, "root": 0}


@pytest.mark.parametrize("path", ["/admin/users/a%00b", "/admin/users/" + "x" * 300])
def test_impossible_usernames_in_the_path_are_404(client, admin, path):
    assert client.patch(path, json={"quota": 1}, headers=admin).status_code == 404
