"""Idempotency-Key on the five charging POST routes, through the app with the real
model and the real database. (Twenty concurrent retries on two gunicorn
processes: tests/api/test_idempotency_live.py.)"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, update

from model_api.db import as_utc
from model_api.models import Call, IdempotencyKey, User
from model_api.services.idempotency import RequestInProgress, fingerprint

from ..conftest import wait_for

HELLO = {"prompt": "Say hello.", "max_tokens": 2, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2, "temperature": 0}
COMPLETION = {"prompt": "Once upon a time", "max_tokens": 2, "temperature": 0}

#: (route, body, success status) of each route that charges a unit
CHARGING = [("/call_model", HELLO, 201), ("/async_call_model", HELLO, 200),
            ("/v1/chat/completions", CHAT, 200), ("/v1/completions", COMPLETION, 200)]
CHARGING_IDS = [r for r, _, _ in CHARGING]


def keyed(headers: dict[str, str], key: str) -> dict[str, str]:
    return {**headers, "Idempotency-Key": key}


def calls(database) -> int:
    with database.session() as s:
        return s.scalar(select(func.count(Call.id)))


def used(database, name: str = "alice") -> int:
    with database.session() as s:
        return s.scalar(select(User.used).where(User.username == name))


def error_code(r) -> str:
    return r.json["error"]["code"]


@pytest.mark.parametrize("route,body,status", CHARGING, ids=CHARGING_IDS)
def test_a_repeat_with_the_same_key_and_body_replays_the_response_without_running_or_charging(
        client, make_user, database, route, body, status):
    headers = keyed(make_user("alice"), "order-1")
    first = client.post(route, json=body, headers=headers)
    again = client.post(route, json=dict(reversed(list(body.items()))), headers=headers)  # key order is not meaning

    assert first.status_code == again.status_code == status, first.json
    assert again.json == first.json
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert again.headers["X-RateLimit-Remaining"] == first.headers["X-RateLimit-Remaining"] == "2"
    assert calls(database) == 1 and used(database) == 1


@pytest.mark.parametrize("route,body,status", CHARGING, ids=CHARGING_IDS)
def test_the_same_key_with_a_different_body_is_422_and_runs_nothing(client, make_user, database, route, body, status):
    headers = keyed(make_user("alice"), "order-1")
    assert client.post(route, json=body, headers=headers).status_code == status
    other = {**body, "max_tokens": 3}
    r = client.post(route, json=other, headers=headers)
    assert r.status_code == 422 and error_code(r) == "idempotency_key_reused"
    assert calls(database) == 1 and used(database) == 1


def test_the_same_key_on_another_route_is_a_different_request(client, make_user):
    headers = keyed(make_user("alice"), "order-1")
    assert client.post("/call_model", json=HELLO, headers=headers).status_code == 201
    r = client.post("/async_call_model", json=HELLO, headers=headers)
    assert r.status_code == 422 and error_code(r) == "idempotency_key_reused"


@pytest.mark.parametrize("route,body,status", CHARGING, ids=CHARGING_IDS)
def test_a_repeat_while_the_first_still_runs_is_409_with_retry_after(app, client, make_user, database,
                                                                    route, body, status):
    headers = keyed(make_user("alice"), "order-1")
    with database.session() as s:
        alice = s.scalar(select(User.id).where(User.username == "alice"))
    # the first request, claimed by this (live) process and not finished yet
    app.extensions["model_api"].idempotency.begin(alice, "order-1", fingerprint("POST", route, body))

    r = client.post(route, json=body, headers=headers)
    assert r.status_code == 409 and error_code(r) == "request_in_progress"
    assert r.headers["Retry-After"] == "1"
    assert calls(database) == 0 and used(database) == 0


def test_a_claim_left_by_a_dead_process_is_taken_over(app, client, make_user, database):
    headers = keyed(make_user("alice"), "order-1")
    with database.session() as s:
        alice = s.scalar(select(User.id).where(User.username == "alice"))
    claim = app.extensions["model_api"].idempotency.begin(alice, "order-1", fingerprint("POST", "/call_model", HELLO))
    with database.session() as s:  # its holder: a process of this host that no longer exists
        s.execute(update(IdempotencyKey).where(IdempotencyKey.id == claim.id).values(worker=f"{_host()}:999999:dead"))

    r = client.post("/call_model", json=HELLO, headers=headers)
    assert r.status_code == 201 and "Idempotent-Replayed" not in r.headers
    assert client.post("/call_model", json=HELLO, headers=headers).headers["Idempotent-Replayed"] == "true"
    assert used(database) == 1


def _host() -> str:
    import socket

    return socket.gethostname()


def test_an_expired_key_runs_the_request_again(make_app, make_user, database):
    app = make_app(idempotency_ttl_seconds=2)
    client = app.test_client()
    headers = keyed(make_user("alice"), "order-1")
    first = client.post("/call_model", json=HELLO, headers=headers)
    assert client.post("/call_model", json=HELLO, headers=headers).headers.get("Idempotent-Replayed") == "true"
    with database.session() as s:
        key = s.scalars(select(IdempotencyKey)).one()
    assert 0 < (as_utc(key.expires_at) - datetime.now(UTC)).total_seconds() <= 2  # kept 2 s from its reply
    time.sleep(max(0.0, (as_utc(key.expires_at) - datetime.now(UTC)).total_seconds()) + 0.1)
    later = client.post("/call_model", json=HELLO, headers=headers)
    assert later.status_code == 201 and "Idempotent-Replayed" not in later.headers
    assert later.json["id"] != first.json["id"]
    assert calls(database) == 2 and used(database) == 2
    with database.session() as s:  # the key was reused in place, not duplicated
        assert s.scalar(select(func.count(IdempotencyKey.id))) == 1


def test_a_request_running_longer_than_the_ttl_keeps_its_key(app, make_user, database):
    make_user("alice")
    keys = app.extensions["model_api"].idempotency
    with database.session() as s:
        alice = s.scalar(select(User.id).where(User.username == "alice"))
    keys.begin(alice, "slow", "f")
    with database.session() as s:  # the TTL has run out while it still runs
        s.execute(update(IdempotencyKey).values(expires_at=IdempotencyKey.created_at))
    with pytest.raises(RequestInProgress):
        keys.begin(alice, "slow", "f")
    assert keys.purge_expired() == 0


def test_keys_are_per_user(client, make_user, database):
    alice, bob = keyed(make_user("alice"), "k"), keyed(make_user("bob"), "k")
    a = client.post("/call_model", json=HELLO, headers=alice)
    b = client.post("/call_model", json=HELLO, headers=bob)
    assert a.status_code == b.status_code == 201
    assert a.json["id"] != b.json["id"] and "Idempotent-Replayed" not in b.headers
    assert used(database, "alice") == used(database, "bob") == 1


def test_an_error_is_not_stored_so_a_retry_with_the_key_runs_again(client, make_user, database):
    headers = keyed(make_user("alice", quota=0), "order-1")
    assert client.post("/call_model", json=HELLO, headers=headers).status_code == 429
    with database.session() as s:
        s.execute(update(User).where(User.username == "alice").values(quota=1))
    r = client.post("/call_model", json=HELLO, headers=headers)
    assert r.status_code == 201 and "Idempotent-Replayed" not in r.headers
    assert used(database) == 1


def test_invalid_input_never_touches_the_key(client, make_user, database):
    headers = keyed(make_user("alice"), "order-1")
    assert client.post("/call_model", json={"prompt": ""}, headers=headers).status_code == 400
    assert client.post("/call_model", json=HELLO, headers=headers).status_code == 201


def streamed_text(r) -> str:
    """The text of an SSE reply, from its chunks' deltas (chat) or texts (completions)."""
    text = ""
    for line in r.get_data(as_text=True).splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[len("data: "):]).get("choices", []):
                text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return text


#: (route, body, replay's status, the replay's text) of each route that streams
STREAMING = [
    ("/call_model", HELLO, 201, lambda b: b["response"]),
    ("/v1/chat/completions", CHAT, 200, lambda b: b["choices"][0]["message"]["content"]),
    ("/v1/completions", COMPLETION, 200, lambda b: b["choices"][0]["text"]),
]


@pytest.mark.parametrize("route,body,status,text_of", STREAMING, ids=[r for r, *_ in STREAMING])
def test_a_repeated_stream_gets_the_streamed_text_as_the_routes_json_reply_without_a_second_charge(
        client, make_user, database, route, body, status, text_of):
    headers = keyed(make_user("alice"), "s-1")
    first = client.post(route, json={**body, "stream": True}, headers=headers)
    assert first.status_code == 200 and first.mimetype == "text/event-stream"
    streamed = streamed_text(first)

    again = client.post(route, json={**body, "stream": True}, headers=headers)
    assert again.status_code == status and again.mimetype == "application/json", again.get_data(as_text=True)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert text_of(again.json) == streamed and streamed
    assert again.headers["X-RateLimit-Remaining"] == first.headers["X-RateLimit-Remaining"] == "2"
    assert calls(database) == 1 and used(database) == 1


def test_a_stream_repeated_while_it_still_streams_is_409_then_replayed(client, make_user, database):
    headers = keyed(make_user("alice"), "s-1")
    body = {**HELLO, "max_tokens": 8, "stream": True}
    first = client.post("/call_model", json=body, headers=headers, buffered=False)  # not read yet: still running
    during = client.post("/call_model", json=body, headers=headers)
    assert during.status_code == 409 and error_code(during) == "request_in_progress"
    streamed = streamed_text(first)
    after = client.post("/call_model", json=body, headers=headers)
    assert after.status_code == 201 and after.json["response"] == streamed
    assert used(database) == 1


def test_a_stream_cut_off_by_the_client_is_replayed_with_the_text_it_had_and_not_charged_again(
        client, make_user, database):
    headers = keyed(make_user("alice"), "s-1")
    body = {**HELLO, "max_tokens": 64, "temperature": 1.0, "seed": 3, "stream": True}
    first = client.post("/call_model", json=body, headers=headers, buffered=False)
    next(first.response)  # the first event, then the client goes away
    first.close()
    wait_for(lambda: _state(database) == "cancelled", timeout=30, what="the stream recorded as cancelled")
    again = client.post("/call_model", json=body, headers=headers)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json["finish_reason"] == "cancelled"
    with database.session() as s:
        assert again.json["response"] == s.scalar(select(Call.response))
    assert used(database) == 1  # the cut-off stream kept its unit, as every cut-off stream does; no second one


def test_a_stream_whose_model_failed_runs_again_on_a_repeat(client, make_user, database):
    headers = keyed(make_user("alice", quota=5), "s-1")
    body = {**HELLO, "stream": True}
    assert client.post("/call_model", json=body, headers=headers).status_code == 200
    with database.session() as s:  # as the ledger records a model failure (refunded)
        s.execute(update(Call).values(status="failed", error="model error: boom"))
    again = client.post("/call_model", json=body, headers=headers)
    assert again.status_code == 200 and again.mimetype == "text/event-stream"
    assert "Idempotent-Replayed" not in again.headers and streamed_text(again)
    assert calls(database) == 2


def _state(database) -> str | None:
    with database.session() as s:
        return s.scalar(select(Call.status))


@pytest.mark.parametrize("key", ["", "   ", "x" * 256, "caf\u00e9", "tab\there"],
                         ids=["empty", "blank", "too-long", "non-ascii", "control"])
def test_a_malformed_key_is_400(client, make_user, key):
    r = client.post("/call_model", json=HELLO, headers=keyed(make_user("alice"), key))
    assert r.status_code == 400 and error_code(r) == "invalid_idempotency_key"


def test_a_cancel_replayed_returns_the_first_answer_not_job_finished(make_app, make_user, database):
    class HoldingQueue:  # keeps jobs queued so there is one to cancel
        def enqueue(self, job_id):
            pass

    app = make_app()
    app.extensions["model_api"]._job_queue = HoldingQueue()
    client = app.test_client()
    headers = make_user("alice")
    job = client.post("/async_call_model", json=HELLO, headers=headers).json["job_id"]
    first = client.post("/async_call_cancel", json={"job_id": job}, headers=keyed(headers, "cancel-1"))
    again = client.post("/async_call_cancel", json={"job_id": job}, headers=keyed(headers, "cancel-1"))
    unkeyed = client.post("/async_call_cancel", json={"job_id": job}, headers=headers)
    assert first.status_code == again.status_code == 200 and again.json == first.json
    assert again.headers["Idempotent-Replayed"] == "true"
    assert unkeyed.status_code == 409 and error_code(unkeyed) == "job_finished"


def test_openai_routes_answer_idempotency_errors_in_openais_shape(client, make_user):
    headers = keyed(make_user("alice"), "order-1")
    assert client.post("/v1/completions", json=COMPLETION, headers=headers).status_code == 200
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": "Twice upon a time"}, headers=headers)
    assert r.status_code == 422
    assert r.json["error"]["code"] == "idempotency_key_reused" and r.json["error"]["type"] == "invalid_request_error"


def test_expired_keys_are_purged(app, make_user, database):
    make_user("alice")
    keys = app.extensions["model_api"].idempotency
    with database.session() as s:
        alice = s.scalar(select(User.id).where(User.username == "alice"))
    for key in ("old", "new"):
        keys.finish(keys.begin(alice, key, "f"), 200, {"ok": key}, {})
    with database.session() as s:
        s.execute(update(IdempotencyKey).where(IdempotencyKey.key == "old")
                  .values(expires_at=IdempotencyKey.created_at))
    assert keys.purge_expired() == 1
    with database.session() as s:
        assert s.scalars(select(IdempotencyKey.key)).all() == ["new"]


def test_openapi_documents_the_header_the_refusals_and_the_replay_marker(client):
    spec = client.get("/openapi.json").json
    for path in ("/call_model", "/async_call_model", "/async_call_cancel", "/v1/chat/completions", "/v1/completions"):
        op = spec["paths"][path]["post"]
        assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in op["parameters"]), path
        assert "409" in op["responses"] and "422" in op["responses"], path
        ok = next(r for s, r in op["responses"].items() if s.startswith("2"))
        assert "Idempotent-Replayed" in ok["headers"], path
    assert not any(p["name"] == "Idempotency-Key" for p in spec["paths"]["/jobs"]["get"]["parameters"])


def test_uuid_keys_as_clients_make_them(client, make_user):
    key = str(uuid.uuid4())
    headers = keyed(make_user("alice"), key)
    assert client.post("/call_model", json=HELLO, headers=headers).status_code == 201
    assert client.post("/call_model", json=HELLO, headers=headers).headers["Idempotent-Replayed"] == "true"
