"""Real HTTP to a real gunicorn server process (two worker processes)."""

import time
from concurrent.futures import ThreadPoolExecutor

import requests
from sqlalchemy import func, select

from model_api.models import Call, User


def test_twenty_concurrent_calls_against_quota_three_admit_exactly_three(live_server, make_user, database):
    make_user("alice", password="correct horse battery")
    with live_server(workers=2, threads=16, DEFAULT_QUOTA="3") as srv:
        def call(i):
            path = "/call_model" if i % 2 else "/async_call_model"
            r = requests.post(srv.url + path, json={"prompt": f"Count to {i}", "max_tokens": 2},
                              auth=("alice", "correct horse battery"), timeout=120)
            return r.status_code

        with ThreadPoolExecutor(20) as pool:
            codes = list(pool.map(call, range(20)))
        admitted = [c for c in codes if c in (200, 201)]
        assert len(admitted) == 3, codes
        assert codes.count(429) == 17, codes
        with database.session() as s:
            assert s.scalar(select(func.count(Call.id))) == 3
            assert s.scalar(select(User.used)) == 3


def test_seed_examples_over_real_http(live_server, make_user):
    make_user("alice", password="correct horse battery")
    auth = ("alice", "correct horse battery")
    with live_server() as srv:
        r = requests.get(srv.url + "/health_check", timeout=5)
        assert r.status_code == 204 and r.content == b""
        r = requests.post(srv.url + "/call_model", json={"prompt": "Hello, world!", "max_tokens": 8}, auth=auth,
                          timeout=60)
        assert r.status_code == 201 and r.json()["response"]
        r = requests.post(srv.url + "/async_call_model", json={"prompt": "Hello, world!", "max_tokens": 8},
                          auth=auth, timeout=60)
        assert r.status_code == 200
        job_id = r.json()["job_id"]
        r = requests.get(srv.url + "/async_call_status", params={"job_id": job_id}, auth=auth, timeout=60)
        assert r.status_code == 200 and r.json()["job_status"] in ("processing", "completed")
        assert "response" in r.json()


def test_thirty_thousand_messages_from_a_user_without_quota_cost_nothing(live_server, make_user):
    """Cheapest checks first: such a body took 15 s of tokenizer CPU before its 422."""
    make_user("broke", password="correct horse battery", quota=0)
    make_user("alice", password="correct horse battery")
    body = {"model": "m", "messages": [{"role": "user", "content": "a"}] * 30000}
    with live_server(threads=8) as srv:
        t0 = time.monotonic()
        r = requests.post(srv.url + "/v1/chat/completions", json=body, auth=("broke", "correct horse battery"),
                          timeout=60)
        refused_in = time.monotonic() - t0
        normal = requests.post(srv.url + "/call_model", json={"prompt": "Hi", "max_tokens": 2},
                               auth=("alice", "correct horse battery"), timeout=60)
    assert r.status_code in (400, 429) and refused_in < 3, (r.status_code, refused_in)
    assert normal.status_code == 201
