"""Limits per user and API key, enforced across processes: a real gunicorn
server with two worker processes sharing counters in real Redis, the real
model, the test database. Each burst is 50 concurrent requests (or N+k), and
exactly the limit's worth is admitted."""

from __future__ import annotations

import os
import threading
import time
from urllib.parse import urlparse

import pytest
import requests
from sqlalchemy import func, select, update

from model_api.models import ApiKey, Call, User
from model_api.services import api_keys
from model_api.services import auth as auth_service

from ..conftest import free_port, need, port_open
from ..server import LiveServer

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/1")
WINDOW = 300  # LIMITS_WINDOW_SECONDS: no burst outlasts it, however slow the machine
SHORT_WINDOW = 10  # the Retry-After test's server: short enough to wait out once


def _forget_counters() -> None:
    """Counters of an earlier run (user ids repeat in a fresh database) must not count here.
    The token windows' keys are wrapped in braces (``LIMITS:{model-api/tpm/...}`` and its
    ``/-1``: limits keeps a sliding window's two keys on one cluster node), so they need their
    own pattern; without it a run within ten minutes of another started with its tokens."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for pattern in ("LIMITS:model-api/*", "LIMITS:{model-api/*", "model-api/concurrency/*"):
        for key in client.scan_iter(pattern):
            client.delete(key)


def _two_processes(db_url: str, log_dir, window: int) -> LiveServer:
    """gunicorn with two worker processes sharing counters in Redis."""
    u = urlparse(REDIS_URL)
    need(port_open(u.hostname or "127.0.0.1", u.port or 6379), f"Redis not reachable at {REDIS_URL}")
    _forget_counters()
    env = {"DATABASE_URL": db_url, "RECOVER_JOBS_AT_START": "false", "ENV": "test", "DEFAULT_QUOTA": "1000",
           "RATE_LIMIT_STORAGE_URL": REDIS_URL, "LIMITS_WINDOW_SECONDS": str(window),
           "MODEL_N_PARALLEL": "4", "MODEL_N_CTX": "1024"}
    return LiveServer(free_port(), env, workers=2, threads=8, log_path=log_dir / "server.log").start()


@pytest.fixture(scope="module")
def server(db_url, tmp_path_factory):
    srv = _two_processes(db_url, tmp_path_factory.mktemp("limits"), WINDOW)
    yield srv
    srv.stop()


def _user_with_key(database, name: str, **limits) -> tuple[int, dict[str, str]]:
    """A user with these limits (``rpm_limit=``...) and a Bearer key (no argon2 in the burst)."""
    with database.session() as s:
        user = auth_service.create_user(s, name, "correct horse battery")
        for column, value in limits.items():
            setattr(user, column, value)
        key = api_keys.create_key(s, user).key
        return user.id, {"Authorization": f"Bearer {key}"}


def _burst(url: str, headers: dict[str, str], n: int, body: dict, path: str = "/v1/chat/completions",
           stream: bool = False) -> list[requests.Response]:
    """``n`` requests released together; streamed replies are kept open until all have answered."""
    barrier = threading.Barrier(n)
    out: list[requests.Response] = []
    lock = threading.Lock()

    def one():
        barrier.wait()
        r = requests.post(url + path, json=body, headers=headers, timeout=300, stream=stream)
        with lock:
            out.append(r)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _chat(max_tokens: int = 1, **extra) -> dict:
    return {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def _rows(database, user_id: int) -> int:
    with database.session() as s:
        return s.scalar(select(func.count(Call.id)).where(Call.user_id == user_id))


def test_requests_per_window_admit_exactly_the_limit_of_50_concurrent(server, database):
    uid, headers = _user_with_key(database, "rpm-burst", rpm_limit=10)
    replies = _burst(server.url, headers, 50, _chat())
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) == 10 and codes.count(429) == 40, (codes, replies[0].text, dict(replies[0].headers))
    for r in replies:
        assert r.headers["x-ratelimit-limit-requests"] == "10"
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert 1 <= int(r.headers["Retry-After"]) <= WINDOW
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
    # each admitted call reports what was left once it was counted (others may have been counted since)
    assert all(0 <= int(r.headers["x-ratelimit-remaining-requests"]) <= 9 for r in replies if r.status_code == 200)
    # nothing charged or written for the refused ones
    assert _rows(database, uid) == 10
    with database.session() as s:
        assert s.scalar(select(User.used).where(User.id == uid)) == 10


def test_calls_in_flight_admit_exactly_the_limit(server, database):
    uid, headers = _user_with_key(database, "concurrency-burst", concurrency_limit=3)
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "max_tokens": 400, "temperature": 0,
            "stream": True}
    replies = _burst(server.url, headers, 12, body, path="/v1/completions", stream=True)
    try:
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) == 3 and codes.count(429) == 9, codes
        refused = next(r for r in replies if r.status_code == 429)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded" and refused.headers["Retry-After"] == "1"
    finally:
        for r in replies:
            r.close()
    # a slot is freed when its call ends (here: the client went away), in whichever process ran it
    def admitted():
        r = requests.post(server.url + "/v1/chat/completions", json=_chat(), headers=headers, timeout=120)
        return r.status_code == 200
    deadline = time.monotonic() + 60
    while not admitted():
        assert time.monotonic() < deadline, "slots were never freed"
        time.sleep(0.5)


def test_retry_after_is_honest(db_url, tmp_path, database):
    server = _two_processes(db_url, tmp_path, SHORT_WINDOW)
    try:
        _, headers = _user_with_key(database, "rpm-retry", rpm_limit=1)
        call = {"prompt": "Hi", "max_tokens": 1}
        # together, so both are counted within one window however long the model takes
        replies = _burst(server.url, headers, 2, call, path="/call_model")
        assert sorted(r.status_code for r in replies) == [201, 429]
        refused = next(r for r in replies if r.status_code == 429)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        wait = int(refused.headers["Retry-After"])
        assert 1 <= wait <= SHORT_WINDOW
        time.sleep(wait)
        again = requests.post(server.url + "/call_model", json=call, headers=headers, timeout=120)
        assert again.status_code == 201, again.text
    finally:
        server.stop()


def test_tokens_per_window_are_settled_to_what_a_short_reply_used(server, database):
    uid, headers = _user_with_key(database, "tpm-settle", tpm_limit=1200, token_budget=10**6)
    # stop at the first space: a reply of a token or two, although up to 1,000 were reserved
    first = requests.post(server.url + "/v1/chat/completions", json=_chat(1000, stop=[" "]), headers=headers,
                          timeout=120)
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["total_tokens"]
    prompt = first.json()["usage"]["prompt_tokens"]
    # at admission the whole reservation was counted
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 1200 - prompt - 1000
    # settled: the second reservation fits only because the first gave back what it did not use
    second = requests.post(server.url + "/v1/chat/completions", json=_chat(1000, stop=[" "]), headers=headers,
                           timeout=120)
    assert second.status_code == 200, second.text
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 1200 - used - prompt - 1000
    # the budget counter (database) was settled to the real counts too
    with database.session() as s:
        tokens_used = s.scalar(select(User.tokens_used).where(User.id == uid))
    assert tokens_used == used + second.json()["usage"]["total_tokens"]


def test_a_request_larger_than_the_token_limit_is_told_not_to_retry(server, database):
    _, headers = _user_with_key(database, "tpm-too-large", tpm_limit=100)
    r = requests.post(server.url + "/v1/chat/completions", json=_chat(500), headers=headers, timeout=60)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r.headers["x-should-retry"] == "false" and "Retry-After" not in r.headers


def test_a_spent_token_budget_is_insufficient_quota_with_nothing_written(server, database):
    uid, headers = _user_with_key(database, "budget", token_budget=150)
    ok = requests.post(server.url + "/v1/chat/completions", json=_chat(20), headers=headers, timeout=120)
    assert ok.status_code == 200, ok.text
    # prompt + 200 can never fit what is left of 150
    r = requests.post(server.url + "/v1/chat/completions", json=_chat(200), headers=headers, timeout=60)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "insufficient_quota" and r.json()["error"]["type"] == "insufficient_quota"
    assert r.headers["x-should-retry"] == "false"
    seed = requests.post(server.url + "/call_model", json={"prompt": "Hi", "max_tokens": 200}, headers=headers,
                         timeout=60)
    assert seed.status_code == 429 and seed.json()["error"]["code"] == "insufficient_quota"
    assert _rows(database, uid) == 1
    with database.session() as s:
        assert s.scalar(select(User.used).where(User.id == uid)) == 1
        assert s.scalar(select(User.tokens_used).where(User.id == uid)) == ok.json()["usage"]["total_tokens"]


def test_a_keys_limit_applies_within_its_users(server, database):
    uid, headers = _user_with_key(database, "key-limits", rpm_limit=10)
    with database.session() as s:
        s.execute(update(ApiKey).where(ApiKey.user_id == uid).values(rpm_limit=1))
    assert requests.post(server.url + "/v1/chat/completions", json=_chat(), headers=headers,
                         timeout=120).status_code == 200
    r = requests.post(server.url + "/v1/chat/completions", json=_chat(), headers=headers, timeout=60)
    assert r.status_code == 429 and "API key" in r.json()["error"]["message"]
    # the user's other credentials still have their own allowance
    basic = requests.post(server.url + "/v1/chat/completions", json=_chat(), timeout=120,
                          auth=("key-limits", "correct horse battery"))
    assert basic.status_code == 200
    assert basic.headers["x-ratelimit-limit-requests"] == "10"
    assert basic.headers["x-ratelimit-remaining-requests"] == "8"


def test_streamed_replies_carry_the_headers(server, database):
    _, headers = _user_with_key(database, "stream-headers", rpm_limit=5, tpm_limit=5000)
    with requests.post(server.url + "/call_model", json={"prompt": "Hi", "max_tokens": 4, "stream": True},
                       headers=headers, timeout=120, stream=True) as r:
        assert r.status_code == 200
        assert r.headers["x-ratelimit-remaining-requests"] == "4"
        assert r.headers["x-ratelimit-limit-tokens"] == "5000"
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        assert b"[DONE]" in r.content
