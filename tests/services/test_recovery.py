"""A restart leaves nothing stuck: orphaned jobs are re-run, interrupted sync calls failed and refunded."""

import subprocess
import uuid
from datetime import timedelta

from sqlalchemy import select

from model_api.db import utcnow
from model_api.models import Call, User
from model_api.process import ProcessIdentity

from ..conftest import wait_for


def _dead_worker() -> str:
    p = subprocess.Popen(["true"])
    p.wait()
    host = ProcessIdentity()().split(":")[0]
    return f"{host}:{p.pid}:deadbeef"


def _row(user_id, kind, status, worker, attempts=1, started=None):
    return Call(
        id=uuid.uuid4(), user_id=user_id, kind=kind, status=status, prompt="Say hi", params={"max_tokens": 4},
        worker=worker, attempts=attempts, started_at=started or utcnow(),
    )


def test_restart_recovers_what_a_crash_left(make_app, make_user, database):
    make_user("alice", quota=10)
    dead = _dead_worker()
    with database.session() as s:
        user = s.scalars(select(User)).one()
        user.used = 4  # the four rows below each hold a unit
        running_job = _row(user.id, "async", "running", dead)
        queued_job = _row(user.id, "async", "queued", None, attempts=0)
        exhausted_job = _row(user.id, "async", "running", dead, attempts=3)
        sync_call = _row(user.id, "sync", "running", dead)
        s.add_all([running_job, queued_job, exhausted_job, sync_call])
        ids = [running_job.id, queued_job.id, exhausted_job.id, sync_call.id]

    make_app(recover_jobs_at_start=True)  # the "restart"

    def all_final():
        with database.session() as s:
            rows = {c.id: c for c in s.scalars(select(Call)).all()}
        return rows if all(r.status in ("completed", "failed") for r in rows.values()) else None

    rows = wait_for(all_final, timeout=120, what="recovered calls to finish")
    assert rows[ids[0]].status == "completed" and rows[ids[0]].response and rows[ids[0]].attempts == 2
    assert rows[ids[1]].status == "completed" and rows[ids[1]].response
    assert rows[ids[2]].status == "failed" and "attempts" in rows[ids[2]].error and not rows[ids[2]].charged
    assert rows[ids[3]].status == "failed" and "restart" in rows[ids[3]].error and not rows[ids[3]].charged
    with database.session() as s:
        assert s.scalars(select(User)).one().used == 2  # two refunds, two completed jobs keep theirs


def test_live_work_of_another_process_is_left_alone(make_app, make_user, database):
    make_user("alice")
    me = ProcessIdentity()()  # this (live) process
    with database.session() as s:
        user = s.scalars(select(User)).one()
        other_live = _row(user.id, "async", "running", me.rsplit(":", 1)[0] + ":othernonce")
        s.add(other_live)
        job_id = other_live.id
    from model_api.services import jobs

    ids, failed = jobs.recover(database, stale_seconds=900)
    assert str(job_id) not in ids and failed == 0
    # ... unless it has been running for longer than the stale limit
    with database.session() as s:
        s.get(Call, job_id).started_at = utcnow() - timedelta(hours=1)
    ids, _ = jobs.recover(database, stale_seconds=900)
    assert str(job_id) in ids
