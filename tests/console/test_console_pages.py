"""The console through Flask's test client: sign-in, the cookie's flags, CSRF on
every state change, who may open what, and the forms' effects (audited)."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select, update

from model_api.models import AdminEvent, ApiKey, User

from ..conftest import DEFAULT_PASSWORD


def token(page) -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', page.get_data(as_text=True)).group(1)


def sign_in(client, username: str, password: str = DEFAULT_PASSWORD):
    csrf = token(client.get("/console/login"))
    return client.post("/console/login", data={"username": username, "password": password, "csrf_token": csrf})


@pytest.fixture
def admin_user(make_user, database):
    make_user("root", quota=100)
    with database.session() as s:
        s.execute(update(User).where(User.username == "root").values(is_admin=True))
    return "root"


def test_signing_in_sets_a_protected_session_cookie_and_signing_out_ends_it(client, make_user):
    make_user("alice")
    r = sign_in(client, "alice")
    assert r.status_code == 302 and r.headers["Location"].endswith("/console/")
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    home = client.get("/console/")
    assert home.status_code == 200 and "Playground" in home.get_data(as_text=True)
    client.post("/console/logout", data={"csrf_token": token(home)})
    assert client.get("/console/").status_code == 302


def test_production_cookies_are_secure(make_app, make_user):
    app = make_app()
    app.config["SESSION_COOKIE_SECURE"] = True  # what ENV=production sets (it also needs PostgreSQL and secrets)
    client = app.test_client()
    make_user("alice")
    assert "Secure" in sign_in(client, "alice").headers["Set-Cookie"]


def test_wrong_passwords_are_refused_then_throttled(make_app, make_user):
    client = make_app(login_throttle_per_account="2/minute").test_client()
    make_user("alice")
    assert sign_in(client, "alice", "wrong password").status_code == 401
    assert sign_in(client, "alice", "wrong password").status_code == 401
    r = sign_in(client, "alice")  # even the right password waits: the guesser learns nothing
    assert r.status_code == 429 and "Too many failed sign-ins" in r.get_data(as_text=True)
    assert sign_in(client, "nobody\x00", "x").status_code == 401


@pytest.mark.parametrize("path", ["/console/logout", "/console/keys", "/console/keys/1/revoke", "/console/chat",
                                  "/console/admin/users", "/console/admin/users/alice", "/console/admin/keys",
                                  "/console/login"])
def test_a_state_change_without_the_csrf_token_is_refused(client, admin_user, make_user, path):
    sign_in(client, admin_user)
    r = client.post(path, data={"username": "mallory", "password": "a long password", "name": "x"})
    assert r.status_code == 403 and "CSRF token is missing" in r.get_data(as_text=True)
    r = client.post(path, data={"csrf_token": "forged"})
    assert r.status_code == 403


def test_the_playground_fetch_without_the_token_gets_json(client, make_user):
    make_user("alice")
    sign_in(client, "alice")
    r = client.post("/console/chat", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 403 and r.json["error"]["code"] == "csrf_failed"


@pytest.mark.parametrize("path", ["/console/admin/users", "/console/admin/keys", "/console/admin/events",
                                  "/console/usage?scope=all&group_by=user"])
def test_a_customer_cannot_open_admin_pages(client, make_user, admin_user, path):
    make_user("alice")
    sign_in(client, "alice")
    r = client.get(path)
    body = r.get_data(as_text=True)
    if path.startswith("/console/usage"):  # their own figures only, never per user
        assert r.status_code == 200 and "root" not in body and "Your usage" in body
    else:
        assert r.status_code == 403 and "for administrators" in body and "root" not in body


def test_pages_need_a_session(client):
    for path in ("/console/", "/console/keys", "/console/history", "/console/usage", "/console/admin/users"):
        r = client.get(path)
        assert r.status_code == 302 and "/console/login" in r.headers["Location"], path
    assert client.get("/", headers={"Accept": "text/html"}).headers["Location"] == "/console/"
    assert client.get("/", headers={"Accept": "application/json"}).is_json


def test_sign_in_never_redirects_elsewhere(app, make_user):
    make_user("alice")
    for target in ("https://evil.example/", "//evil.example/", "/console/\\evil"):
        client = app.test_client()
        csrf = token(client.get("/console/login"))
        r = client.post("/console/login", data={"username": "alice", "password": DEFAULT_PASSWORD,
                                                "csrf_token": csrf, "next": target})
        assert r.headers["Location"].endswith("/console/"), target


def test_a_password_change_ends_the_session(client, make_user, database):
    make_user("alice")
    sign_in(client, "alice")
    assert client.get("/console/").status_code == 200
    from model_api.services import auth as auth_service

    with database.session() as s:
        auth_service.set_password(s, "alice", "a brand new password")
    assert client.get("/console/").status_code == 302


def test_an_admin_manages_users_and_keys_through_the_forms(client, admin_user, database):
    sign_in(client, admin_user)
    csrf = token(client.get("/console/admin/users"))
    r = client.post("/console/admin/users", data={"csrf_token": csrf, "username": "acme",
                                                 "password": "a long password", "quota": "7"})
    assert r.status_code == 302
    page = client.get("/console/admin/users").get_data(as_text=True)
    assert 'data-user="acme"' in page and "Created acme." in page
    client.post("/console/admin/users/acme", data={"csrf_token": csrf, "action": "quota", "quota": "9"})
    client.post("/console/admin/users/acme", data={"csrf_token": csrf, "action": "deactivate"})
    bad = client.post("/console/admin/users", data={"csrf_token": csrf, "username": "x", "password": "short"},
                      follow_redirects=True)
    assert "at least 8" in bad.get_data(as_text=True)
    client.post("/console/admin/keys", data={"csrf_token": csrf, "user": "acme", "name": "ci"})
    keys_page = client.get("/console/admin/keys").get_data(as_text=True)
    shown = re.search(r'id="new-key">(mk-[^<]+)<', keys_page).group(1)
    assert shown not in client.get("/console/admin/keys").get_data(as_text=True)  # once
    with database.session() as s:
        acme = s.scalars(select(User).where(User.username == "acme")).one()
        assert (acme.quota, acme.is_active) == (9, False)
        assert s.scalar(select(ApiKey.name).where(ApiKey.user_id == acme.id)) == "ci"
        assert [e.action for e in s.scalars(select(AdminEvent).order_by(AdminEvent.id))] == [
            "user.create", "user.update", "user.update", "key.create"]
    assert "user.create" in client.get("/console/admin/events").get_data(as_text=True)


def test_a_customer_creates_and_revokes_own_keys_only(client, make_user, database):
    make_user("alice")
    make_user("bob")
    with database.session() as s:
        bob_id = s.scalar(select(User.id).where(User.username == "bob"))
        s.add(ApiKey(user_id=bob_id, prefix="mk-bobbobbo", key_hash="0" * 64))
    sign_in(client, "alice")
    csrf = token(client.get("/console/keys"))
    client.post("/console/keys", data={"csrf_token": csrf, "name": "laptop"})
    page = client.get("/console/keys").get_data(as_text=True)
    assert "laptop" in page and "mk-bobbobbo" not in page and 'id="new-key"' in page
    with database.session() as s:
        bobs = s.scalar(select(ApiKey.id).where(ApiKey.user_id == bob_id))
    r = client.post(f"/console/keys/{bobs}/revoke", data={"csrf_token": csrf, "any": "1"}, follow_redirects=True)
    assert "no API key" in r.get_data(as_text=True)
    with database.session() as s:
        assert s.scalar(select(ApiKey.revoked_at).where(ApiKey.id == bobs)) is None


def test_usage_page_and_csv_show_the_calls(client, make_user):
    alice = make_user("alice", quota=5)
    client.post("/call_model", json={"prompt": "Hi", "max_tokens": 2}, headers=alice)
    sign_in(client, "alice")
    page = client.get("/console/usage").get_data(as_text=True)
    assert "<svg" in page and "1 calls" in page
    r = client.get("/console/usage.csv?group_by=model")
    assert r.mimetype == "text/csv" and r.get_data(as_text=True).splitlines()[1].split(",")[2] == "1"
    assert client.get("/console/usage.csv?group_by=user").status_code == 400
    assert "Hi" in client.get("/console/history").get_data(as_text=True)


@pytest.mark.parametrize(("method", "path", "data"), [
    ("post", "/console/admin/users/a%00b", {"action": "deactivate"}),
    ("post", "/console/admin/users/" + "x" * 300, {"action": "quota", "quota": "5"}),
    ("post", "/console/admin/users", {"username": "a\x00b", "password": "a long password"}),
    ("post", "/console/admin/users", {"username": "acme", "password": "a long\x00password"}),
    ("post", "/console/admin/users", {"username": "acme", "password": "a long password", "quota": "99999999999"}),
    ("post", "/console/admin/keys", {"user": "a\x00b"}),
    ("post", "/console/admin/keys", {"user": "root", "name": "\x00"}),
    ("post", "/console/admin/keys", {"user": "root", "expires_at": "1999-01-01"}),
    ("post", "/console/keys", {"name": "bad\x00name"}),
    ("post", "/console/keys", {"expires_at": "soon"}),
    ("get", "/console/admin/users?q=%00&after=%00", None),
    ("get", "/console/usage?group_by=%00&scope=%00", None),
])
def test_hostile_console_input_is_a_clear_refusal_never_a_500(client, admin_user, method, path, data):
    sign_in(client, admin_user)
    csrf = token(client.get("/console/keys"))
    r = (client.post(path, data={**data, "csrf_token": csrf}, follow_redirects=True) if method == "post"
         else client.get(path))
    assert r.status_code in (200, 400, 404), r.status_code
    if method == "post":
        assert 'class="flash error"' in r.get_data(as_text=True)
