"""Idempotency-Key across processes: real HTTP to a gunicorn server with two
worker processes (each with its own database pool and model), real model,
real PostgreSQL (or the SQLite file)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select

from model_api.models import Call, User

pytestmark = [pytest.mark.model, pytest.mark.slow]

AUTH = ("alice", "correct horse battery")


def post_until_answered(url: str, body: dict, key: str) -> tuple[requests.Response, int]:
    """What a well-behaved client does: retry a 409 request_in_progress after its
    Retry-After. Returns the final answer and how many 409s came before it."""
    in_progress = 0
    while True:
        r = requests.post(url, json=body, auth=AUTH, headers={"Idempotency-Key": key}, timeout=120)
        if r.status_code != 409:
            return r, in_progress
        assert r.json()["error"]["code"] == "request_in_progress", r.text
        in_progress += 1
        time.sleep(float(r.headers["Retry-After"]) / 4)  # impatient, to put more pressure on the key


@pytest.mark.parametrize("route,status", [("/call_model", 201), ("/v1/completions", 200),
                                          ("/async_call_model", 200)])
def test_twenty_concurrent_retries_with_one_key_on_two_processes_run_once_and_charge_once(
        live_server, make_user, database, route, status):
    make_user(AUTH[0], password=AUTH[1], quota=5)
    body = {"prompt": "Write one sentence about the sea.", "max_tokens": 24, "temperature": 0}
    with live_server(workers=2, threads=16) as srv:
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: post_until_answered(srv.url + route, body, "order-42"), range(20)))

    replies = [r for r, _ in answers]
    assert [r.status_code for r in replies] == [status] * 20, [r.text for r in replies]
    assert len({r.content for r in replies}) == 1  # twenty identical responses
    assert sum(r.headers.get("Idempotent-Replayed") != "true" for r in replies) == 1  # one ran, 19 replayed
    assert {r.headers["X-RateLimit-Remaining"] for r in replies} == {"4"}
    if route != "/async_call_model":  # (a submit is over too quickly to be sure someone sees it running)
        assert sum(n for _, n in answers) >= 1  # the others did find it in progress, and waited
    with database.session() as s:
        assert s.scalar(select(func.count(Call.id))) == 1  # exactly one model call
        assert s.scalar(select(User.used)) == 1  # one unit charged
