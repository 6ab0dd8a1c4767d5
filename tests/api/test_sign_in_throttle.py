"""Password guessing is throttled per (account, address) and per address, with
an honest Retry-After, without locking anyone out of API-key access."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from model_api.models import User
from model_api.services import api_keys

from ..conftest import DEFAULT_PASSWORD, basic

GUESSER, CUSTOMER = "203.0.113.7", "198.51.100.20"


@pytest.fixture
def app(make_app):
    return make_app(login_throttle_per_account="3/2 seconds", login_throttle_per_address="5/minute")


def _calls(client, headers, address):
    return client.get("/calls", headers=headers, environ_base={"REMOTE_ADDR": address})


def _guess(client, address, user="alice", times=1):
    return [_calls(client, basic(user, "wrong guess"), address).status_code for _ in range(times)]


def test_after_three_wrong_passwords_even_the_right_one_waits(client, make_user):
    headers = make_user("alice")
    assert _guess(client, GUESSER, times=3) == [401, 401, 401]
    r = _calls(client, headers, GUESSER)
    assert r.status_code == 429 and r.json["error"]["code"] == "too_many_sign_in_failures"
    assert 1 <= int(r.headers["Retry-After"]) <= 2


def test_retry_after_is_honest(client, make_user):
    headers = make_user("alice")
    _guess(client, GUESSER, times=3)
    wait = int(_calls(client, headers, GUESSER).headers["Retry-After"])
    time.sleep(wait + 0.1)
    assert _calls(client, headers, GUESSER).status_code == 200


def test_a_guesser_elsewhere_does_not_lock_the_customer_out(client, make_user):
    headers = make_user("alice")
    _guess(client, GUESSER, times=4)
    assert _calls(client, headers, CUSTOMER).status_code == 200


def test_api_keys_are_never_throttled(client, make_user, database):
    make_user("alice")
    with database.session() as s:
        key = api_keys.create_key(s, s.scalar(select(User).where(User.username == "alice")), "ci").key
    _guess(client, GUESSER, times=6)
    assert _calls(client, {"Authorization": f"Bearer {key}"}, GUESSER).status_code == 200


def test_one_address_guessing_many_accounts_is_throttled(client, make_user):
    for name in ("alice", "bob", "carol"):
        make_user(name)
    codes = [code for name in ("alice", "bob", "carol") for code in _guess(client, GUESSER, user=name, times=2)]
    assert codes[:5] == [401] * 5 and codes[5] == 429


def test_throttled_sign_ins_are_counted(client, make_user):
    make_user("alice")
    _guess(client, GUESSER, times=4)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'reason="throttled"' in metrics and 'scheme="basic"' in metrics


def test_the_default_allowance_leaves_room_for_typos(make_app, make_user):
    client = make_app().test_client()
    headers = make_user("alice", password=DEFAULT_PASSWORD)
    _guess(client, CUSTOMER, times=4)
    assert _calls(client, headers, CUSTOMER).status_code == 200
