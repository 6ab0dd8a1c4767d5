"""services/jobs.py: how an async job is queued and run, on a real database with a
fake engine (the model's part is tested through the real model in tests/jobs)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from sqlalchemy import update

from model_api.engine.base import GenerationRequest, SamplingParams, Tenant
from model_api.models import ApiKey, CallKind
from model_api.services import api_keys, auth
from model_api.services.intent import CallIntent
from model_api.services.jobs import CancelRegistry, Jobs
from model_api.services.ledger import Ledger, QuotaPolicy

from ..fakes import FakeEngine, registry_of


class RecordingQueue:
    """A queue that serves users in turn, as the in-process executor is: records what it is given."""

    def __init__(self) -> None:
        self.queued: list[tuple[str, int, int]] = []

    def enqueue(self, job_id: str) -> None:  # pragma: no cover - the fair path is the one under test
        raise AssertionError("a fair queue is given the user and weight")

    def enqueue_for(self, job_id: str, user_id: int, weight: int = 1) -> None:
        self.queued.append((job_id, user_id, weight))


@pytest.mark.parametrize("priority", [1, 3])
def test_a_job_is_queued_and_run_with_its_api_keys_priority(database, priority):
    with database.session() as s:
        user = auth.create_user(s, "alice", "correct horse battery", None)
        key = api_keys.create_key(s, user)
        s.execute(update(ApiKey).where(ApiKey.id == key.id).values(priority=priority))
        user_id = user.id
    engine, queue = FakeEngine(), RecordingQueue()
    jobs = Jobs(Ledger(database), registry_of(engine), QuotaPolicy(3, None), lambda: queue, CancelRegistry(),
                lambda: "test-worker")
    request = replace(GenerationRequest.single_prompt("Hi", SamplingParams(max_tokens=2)),
                      tenant=Tenant(user_id, priority))  # as api/context.py builds it from the credentials
    outcome = jobs.submit(CallIntent(user_id=user_id, request=request, kind=CallKind.ASYNC, api_key_id=key.id))

    assert queue.queued == [(str(outcome.call_id), user_id, priority)]
    assert jobs.run(outcome.call_id) == "completed"
    assert engine.started[-1]._request.tenant == Tenant(user_id, priority)
