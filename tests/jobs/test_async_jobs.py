"""Async jobs end to end, over HTTP to a real gunicorn server, with the real model,
run either by the in-process executor (no broker) or by real `celery worker`
processes over real Redis; PostgreSQL (or the SQLite file) is checked directly.

Redis: the machine's at REDIS_URL (default db 1) for the ordinary runs, each
test on its own queue name; a private redis-server for the restart test.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest
import requests
from sqlalchemy import select

from model_api.models import Call, User

from ..conftest import basic, need, port_open, wait_for
from .procs import ApiServer, RedisServer, Worker, env_for, wait_all_final

pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.timeout(900)]

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/1")
FINAL = ("completed", "failed", "cancelled")


def _need_redis() -> None:
    u = urlparse(REDIS_URL)
    need(port_open(u.hostname or "127.0.0.1", u.port or 6379), f"Redis not reachable at {REDIS_URL}")


class Stack:
    """An API server plus (with a broker) Celery workers, on one database."""

    def __init__(self, db_url: str, tmp_path, broker: str | None, **settings: object):
        self.tmp = tmp_path
        self.queue = f"model_api.test.{uuid.uuid4().hex[:8]}"
        self.env = env_for(
            db_url,
            celery_broker_url=broker,
            celery_queue=self.queue,
            job_workers=1,
            reconcile_interval_seconds=2,
            **settings,
        )
        self.broker = broker
        self.workers: list[Worker] = []
        self.server = ApiServer(self.env, tmp_path / "server.log")

    def add_worker(self, *, via_cli: bool = False) -> Worker:
        n = len(self.workers) + 1
        w = Worker(self.env, self.tmp / f"worker{n}.log", f"w{n}-{self.queue}", via_cli=via_cli)
        self.workers.append(w)
        w.wait_ready()
        return w

    def submit(self, headers, prompt: str, **params) -> str:
        r = requests.post(self.server.url + "/async_call_model", json={"prompt": prompt, **params},
                          headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["job_id"]

    def status(self, headers, job_id: str) -> dict:
        r = requests.get(self.server.url + "/async_call_status", params={"job_id": job_id}, headers=headers,
                         timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def cancel(self, headers, job_id: str) -> requests.Response:
        return requests.post(self.server.url + "/async_call_cancel", json={"job_id": job_id}, headers=headers,
                             timeout=10)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.server.stop()
        if self.broker:
            import redis

            try:
                redis.Redis.from_url(self.broker, socket_timeout=2).delete(self.queue)
            except redis.RedisError:
                pass


@pytest.fixture
def stack(db_url, tmp_path) -> Iterator:
    """stack(kind, **settings): 'inprocess', or 'celery' with N workers (`workers=`)."""
    made: list[Stack] = []

    def _make(kind: str, workers: int = 1, broker: str | None = None, **settings) -> Stack:
        if kind == "celery" and broker is None:
            _need_redis()
            broker = REDIS_URL
        st = Stack(db_url, tmp_path, broker if kind == "celery" else None, **settings)
        made.append(st)
        st.server.wait_ready()
        for i in range(workers if kind == "celery" else 0):
            st.add_worker(via_cli=(i == 1))  # the second worker starts through `model-api worker`
        return st

    yield _make
    for st in made:
        st.stop()


def _rows(database) -> list[Call]:
    with database.session() as s:
        return list(s.scalars(select(Call)).all())


def _used(database, name: str) -> int:
    with database.session() as s:
        return s.scalar(select(User.used).where(User.username == name))


@pytest.mark.parametrize(
    "kind,workers", [("inprocess", 0), ("celery", 1), ("celery", 2)], ids=["inprocess", "celery-1", "celery-2"]
)
def test_twenty_jobs_all_complete_with_a_model_response(stack, make_user, database, kind, workers):
    st = stack(kind, workers=workers)
    headers = make_user("alice", quota=20)
    ids = [st.submit(headers, f"Say a word about the number {i}.", max_tokens=3, temperature=0) for i in range(20)]
    replies = wait_all_final(st.server.url, headers, ids)

    assert {r["state"] for r in replies.values()} == {"completed"}, replies
    assert all(r["job_status"] == "completed" and r["response"].strip() for r in replies.values())
    rows = _rows(database)
    assert len(rows) == 20
    assert all(c.status == "completed" and c.attempts == 1 and c.charged for c in rows)
    assert _used(database, "alice") == 20
    if workers == 2:
        # both workers took jobs from the one shared queue
        assert len({c.worker for c in rows}) == 2, [c.worker for c in rows]


def test_kill_9_worker_mid_run_then_a_new_worker_finishes_every_job_once(stack, make_user, database):
    st = stack("celery", workers=1)
    headers = make_user("alice", quota=6)
    ids = [st.submit(headers, f"Tell a short story about a cat named {i}.", max_tokens=48, temperature=0)
           for i in range(6)]

    wait_for(lambda: any(c.status == "running" for c in _rows(database)), timeout=300, what="a running job")
    st.workers[0].kill9()
    interrupted = {str(c.id) for c in _rows(database) if c.status == "running"}  # frozen: its worker is dead
    assert interrupted
    st.add_worker()  # its start-up sweep re-queues what the dead worker held

    replies = wait_all_final(st.server.url, headers, ids)
    assert {r["state"] for r in replies.values()} == {"completed"}, replies
    rows = {str(c.id): c for c in _rows(database)}
    assert len(rows) == 6  # no duplicate job
    assert all(c.response and c.charged for c in rows.values())
    # the job killed mid-run ran again (2 attempts, one stored response), the others exactly once
    assert all(rows[j].attempts == 2 for j in interrupted)
    assert all(rows[j].attempts == 1 for j in rows if j not in interrupted)
    assert _used(database, "alice") == 6  # each charged once


def test_redis_restart_mid_run_consumption_resumes_without_restarting_the_worker(
    stack, make_user, database, tmp_path
):
    need(shutil.which("redis-server") is not None, "redis-server is not installed")
    redis_srv = RedisServer(tmp_path / "redis.log")
    try:
        st = stack("celery", workers=1, broker=redis_srv.url, job_requeue_after_seconds=4)
        worker = st.workers[0]
        headers = make_user("alice", quota=8)
        ids = [st.submit(headers, f"Name a fruit, number {i}.", max_tokens=6, temperature=0) for i in range(6)]
        wait_for(lambda: any(c.status == "completed" for c in _rows(database)), timeout=300, what="a first job")

        # restart Redis: no persistence, so every message still in the queue is lost
        port = redis_srv.port
        redis_srv.stop()
        redis_srv = RedisServer(tmp_path / "redis2.log", port=port)

        # publishing works again (a fresh connection replaces the dead pooled one)
        ids += [st.submit(headers, f"Name a colour, number {i}.", max_tokens=6, temperature=0) for i in range(2)]
        replies = wait_all_final(st.server.url, headers, ids)
        assert {r["state"] for r in replies.values()} == {"completed"}, replies
        assert worker.alive() and len(st.workers) == 1  # the same worker process did it all
        assert all(c.status == "completed" and c.charged for c in _rows(database))
        assert _used(database, "alice") == 8
    finally:
        redis_srv.stop()


def test_broker_down_at_submit_is_503_refunded_and_leaves_no_processing_row(make_app, make_user, database, db_url):
    from ..conftest import free_port

    app = make_app(celery_broker_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    client = app.test_client()
    headers = make_user("alice", quota=1)
    r = client.post("/async_call_model", json={"prompt": "Hello", "max_tokens": 2}, headers=headers)
    assert r.status_code == 503, r.json
    assert r.json["error"]["code"] == "queue_unavailable"
    assert _used(database, "alice") == 0
    (row,) = _rows(database)
    assert row.status == "failed" and not row.charged and "enqueue" in row.error
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert ready.json["components"]["broker"]["status"] == "error"
    # the unit came back: a second try is refused by the queue again, not by the quota (429)
    assert client.post("/async_call_model", json={"prompt": "Hello", "max_tokens": 2},
                       headers=headers).status_code == 503
    assert _used(database, "alice") == 0


@pytest.mark.parametrize("kind", ["inprocess", "celery"])
def test_cancel_a_queued_and_a_running_job(stack, make_user, database, kind):
    st = stack(kind, workers=1)
    headers = make_user("alice", quota=3)
    other = make_user("mallory", quota=1)
    # temperature 2 makes end-of-text unlikely: this one runs for its 1024 tokens unless stopped
    long_job = st.submit(headers, "Tell me a very long story.", max_tokens=1024, temperature=2.0, top_p=1.0, seed=1)
    queued_job = st.submit(headers, "Say hi.", max_tokens=2, temperature=0)
    wait_for(lambda: st.status(headers, long_job)["state"] == "running", timeout=300, what="long job running")
    assert st.status(headers, queued_job)["state"] == "queued"

    # another user's job and an unknown id: the same 404
    assert st.cancel(other, queued_job).status_code == 404
    unknown = st.cancel(headers, str(uuid.uuid4()))
    assert unknown.status_code == 404
    assert st.cancel(other, queued_job).json() == unknown.json()

    r = st.cancel(headers, queued_job)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "cancelled" and r.json()["job_status"] == "cancelled"
    assert _used(database, "alice") == 1  # the queued job's unit is back

    r = st.cancel(headers, long_job)
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "running" and r.json()["cancel_requested"] is True
    wait_for(lambda: st.status(headers, long_job)["state"] == "cancelled", timeout=120, what="running job stopped")
    body = st.status(headers, long_job)
    assert body["job_status"] == "cancelled" and "cancelled" in body["error"]

    # finished jobs cannot be cancelled
    r = st.cancel(headers, long_job)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"

    # the queue moves on; the cancelled queued job never ran (its message, if any, was a no-op)
    last = st.submit(headers, "Say bye.", max_tokens=2, temperature=0)
    assert wait_all_final(st.server.url, headers, [last])[last]["state"] == "completed"
    rows = {str(c.id): c for c in _rows(database)}
    assert rows[queued_job].status == "cancelled" and rows[queued_job].attempts == 0
    assert rows[long_job].status == "cancelled" and rows[long_job].completion_tokens < 1024
    assert _used(database, "alice") == 2  # long job kept (work was done), last job charged


def test_bad_cancel_requests_are_400(client, make_user):
    headers = make_user("alice")
    assert client.post("/async_call_cancel", json={}, headers=headers).status_code == 400
    r = client.post("/async_call_cancel", json={"job_id": "not-a-uuid"}, headers=headers)
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_request"
    assert client.post("/async_call_cancel", json={"job_id": str(uuid.uuid4())}).status_code == 401
    assert client.post("/async_call_cancel", json={"job_id": str(uuid.uuid4())},
                       headers=basic("alice")).status_code == 404


def test_sigterm_lets_the_running_job_finish_and_loses_none(stack, make_user, database):
    st = stack("celery", workers=1)
    headers = make_user("alice", quota=4)
    ids = [st.submit(headers, f"Describe the colour number {i}.", max_tokens=24, temperature=0) for i in range(4)]
    wait_for(lambda: any(c.status == "running" for c in _rows(database)), timeout=300, what="a running job")
    running = {str(c.id) for c in _rows(database) if c.status == "running"}
    st.workers[0].stop()  # SIGTERM: Celery's warm shutdown
    rows = {str(c.id): c for c in _rows(database)}
    assert all(rows[j].status == "completed" for j in running)  # finished, not abandoned
    assert not any(c.status == "running" for c in rows.values())

    st.add_worker()
    replies = wait_all_final(st.server.url, headers, ids)
    assert {r["state"] for r in replies.values()} == {"completed"}, replies
    assert all(c.attempts == 1 for c in _rows(database))  # nothing was cut off and re-run
    assert _used(database, "alice") == 4
