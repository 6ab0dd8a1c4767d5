"""/async_call_model + /async_call_status with the in-process executor and the real model."""

import uuid

from sqlalchemy import select

from model_api.models import Call, User

from ..conftest import wait_for


def _poll(client, job_id, headers, timeout=120):
    def done():
        r = client.get(f"/async_call_status?job_id={job_id}", headers=headers)
        assert r.status_code == 200, r.json
        return r.json if r.json["job_status"] != "processing" else None

    return wait_for(done, timeout=timeout, what=f"job {job_id}")


def test_async_job_completes_with_the_models_reply(client, make_user, database):
    headers = make_user("alice")
    r = client.post("/async_call_model", json={"prompt": "Hello, world!", "max_tokens": 8}, headers=headers)
    assert r.status_code == 200, r.json
    job_id = r.json["job_id"]
    assert uuid.UUID(job_id).version == 4
    assert set(r.json) == {"job_id"}
    assert r.headers["X-RateLimit-Remaining"] == "2"
    status = _poll(client, job_id, headers)
    assert status["job_status"] == "completed" and status["state"] == "completed"
    assert isinstance(status["response"], str) and status["response"].strip()
    assert status["usage"]["completion_tokens"] >= 1
    with database.session() as s:
        call = s.get(Call, uuid.UUID(job_id))
        assert call.kind == "async" and call.prompt == "Hello, world!"
        assert call.response == status["response"] and call.attempts == 1


def test_status_while_processing_matches_the_seed(client, make_user):
    headers = make_user("alice")
    job_id = client.post("/async_call_model", json={"prompt": "Tell me a long story.", "max_tokens": 24},
                         headers=headers).json["job_id"]
    first = client.get(f"/async_call_status?job_id={job_id}", headers=headers).json
    if first["job_status"] == "processing":  # usually; a fast machine may already be done
        assert first["response"] is None and first["state"] in ("queued", "running")
    _poll(client, job_id, headers)


def test_sync_and_async_share_the_allowance(client, make_user):
    headers = make_user("alice")
    assert client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=headers).status_code == 201
    assert client.post("/async_call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=headers).status_code == 200
    assert client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=headers).status_code == 201
    r = client.post("/async_call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=headers)
    assert r.status_code == 429 and r.json["error"]["code"] == "quota_exceeded"


def test_another_users_job_is_the_same_404_as_an_unknown_one(client, make_user):
    alice, bob = make_user("alice"), make_user("bob")
    job_id = client.post("/async_call_model", json={"prompt": "My secret is 1234", "max_tokens": 4},
                         headers=alice).json["job_id"]
    _poll(client, job_id, alice)
    theirs = client.get(f"/async_call_status?job_id={job_id}", headers=bob)
    unknown = client.get(f"/async_call_status?job_id={uuid.uuid4()}", headers=bob)
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json == unknown.json
    assert "1234" not in theirs.get_data(as_text=True)


def test_sync_call_ids_are_not_jobs(client, make_user):
    headers = make_user("alice")
    call_id = client.post("/call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=headers).json["id"]
    assert client.get(f"/async_call_status?job_id={call_id}", headers=headers).status_code == 404


def test_queue_full_is_503_and_refunds(make_app, make_user, database):

    class RefusingQueue:
        def enqueue(self, job_id):
            raise RuntimeError("queue is full")

    app = make_app()
    rt = app.extensions["model_api"]
    rt._job_queue = RefusingQueue()
    client = app.test_client()
    headers = make_user("alice")
    r = client.post("/async_call_model", json={"prompt": "Hi", "max_tokens": 1}, headers=headers)
    assert r.status_code == 503 and r.json["error"]["code"] == "queue_unavailable"
    with database.session() as s:
        call = s.scalars(select(Call)).one()
        assert call.status == "failed" and call.charged is False
        assert s.scalar(select(User.used)) == 0
