"""The reconciler and the Celery settings, on the real database (no model, no broker)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from pydantic import ValidationError
from sqlalchemy import select, update

from model_api.celery_app import celery_config
from model_api.db import utcnow
from model_api.engine.base import GenerationRequest, SamplingParams
from model_api.models import Call, CallKind, User
from model_api.services import auth, jobs
from model_api.services.ledger import QuotaPolicy, open_call
from model_api.settings import Settings

from ..fakes import intent_for

POLICY = QuotaPolicy(default_quota=5, window_seconds=None)


def _job(database, created_ago: float = 0.0, **values) -> uuid.UUID:
    with database.session() as s:
        user = s.scalar(select(User).where(User.username == "alice")) or auth.create_user(s, "alice", "pw-long-enough")
        s.flush()
        user_id = user.id
    request = GenerationRequest.single_prompt("hi", SamplingParams(max_tokens=1))
    job_id, _ = open_call(database, intent_for(user_id, request, CallKind.ASYNC), POLICY, prompt_tokens=3,
                          model="m", worker="unused")
    with database.session() as s:
        call = s.get(Call, job_id)
        call.created_at = utcnow() - timedelta(seconds=created_ago)
        for k, v in values.items():
            setattr(call, k, v)
    return job_id


def test_only_jobs_queued_too_long_are_requeued_and_only_once_per_window(database):
    old, fresh = _job(database, created_ago=120), _job(database, created_ago=1)
    ids, _ = jobs.recover(database, stale_seconds=900, requeue_after=60)
    assert ids == [str(old)]
    # a second sweeper (another worker) right after finds nothing to re-send
    assert jobs.recover(database, stale_seconds=900, requeue_after=60)[0] == []
    # without a broker every queued job is enqueued again (the memory queue died)
    assert set(jobs.recover(database, stale_seconds=900)[0]) == {str(old), str(fresh)}


def test_jobs_out_of_attempts_are_failed_and_refunded(database):
    job = _job(database, created_ago=120, attempts=jobs.MAX_ATTEMPTS)
    ids, failed = jobs.recover(database, stale_seconds=900, requeue_after=60)
    assert ids == [] and failed == 1
    with database.session() as s:
        call = s.get(Call, job)
        assert call.status == "failed" and not call.charged
        assert s.scalar(select(User.used)) == 0


def test_orphan_of_a_dead_process_is_requeued_or_cancelled_if_asked(database):
    dead = "somehost-that-is-not-this-one:1:x"
    requeue = _job(database, status="running", attempts=1, worker=dead, started_at=utcnow() - timedelta(hours=1))
    cancelled = _job(database, status="running", attempts=1, worker=dead, started_at=utcnow() - timedelta(hours=1),
                     cancel_requested=True)
    ids, _ = jobs.recover(database, stale_seconds=900, requeue_after=60)
    assert ids == [str(requeue)]
    with database.session() as s:
        assert s.get(Call, requeue).status == "queued"
        assert s.get(Call, cancelled).status == "cancelled"


def test_cancel_registry_sees_a_flag_set_by_another_process(database):
    job = _job(database, status="running", attempts=1)
    registry = jobs.CancelRegistry(database, poll_seconds=60)  # poll by hand below
    event = registry.register(str(job))
    assert registry.poll_once() == 0 and not event.is_set()
    with database.session() as s:  # what /async_call_cancel does, from any process
        s.execute(update(Call).where(Call.id == job).values(cancel_requested=True))
    assert registry.poll_once() == 1 and event.is_set()


def test_visibility_timeout_must_outlast_the_hard_time_limit():
    with pytest.raises(ValidationError, match="VISIBILITY_TIMEOUT"):
        Settings(celery_task_time_limit=600, celery_visibility_timeout=600)


def test_celery_is_configured_for_kill_safety():
    conf = celery_config(Settings(celery_broker_url="redis://127.0.0.1:6379/1", celery_task_time_limit=100,
                                  celery_visibility_timeout=200))
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["broker_transport_options"]["visibility_timeout"] == 200
    assert conf["result_backend_transport_options"]["visibility_timeout"] == 200
    assert conf["task_time_limit"] == 100 and conf["task_soft_time_limit"] < 100
    assert conf["broker_connection_max_retries"] is None  # workers outlive broker restarts
