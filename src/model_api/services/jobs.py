"""Async jobs: rows first, then a queue entry carrying only the job id.

``run_job(job_id)`` is the single entry point used by both the in-process
executor and the Celery task, so the two paths cannot drift apart.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

from sqlalchemy import select, update

from ..db import Database, as_utc, utcnow
from ..engine.base import ContextOverflow, Engine, EngineError
from ..models import Call, CallKind, CallStatus, User
from ..observability import logs, metrics
from . import calls
from .calls import CallOutcome, QuotaPolicy

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


class QueueUnavailable(Exception):
    """The job could not be handed to a queue (broker down, queue full)."""


class JobQueue(Protocol):
    def enqueue(self, job_id: str) -> None: ...


class CancelRegistry:
    """Cancel events of the jobs running in this process, by job id."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def register(self, job_id: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(job_id, threading.Event())

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._events.pop(job_id, None)

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            ev = self._events.get(job_id)
        if ev is not None:
            ev.set()
        return ev is not None


def submit(
    db: Database,
    engine: Engine,
    queue: JobQueue,
    user_id: int,
    request,
    policy: QuotaPolicy,
    *,
    request_id: str | None = None,
) -> CallOutcome:
    """Charge, store the job row, commit, and only then enqueue its id.

    If the queue refuses, the job is failed with its unit refunded and
    QueueUnavailable is raised: nothing stays 'processing' for ever.
    """
    prompt_tokens = engine.check(request)
    with db.session() as s:
        user = s.get(User, user_id)
        assert user is not None
        call, state = calls.admit(
            s, user, request, CallKind.ASYNC, policy, prompt_tokens=prompt_tokens,
            model=engine.model_name, request_id=request_id,
        )
        job_id = call.id
    try:
        queue.enqueue(str(job_id))
    except Exception as exc:
        calls.record_failure(db, job_id, f"could not enqueue: {exc}")
        raise QueueUnavailable(str(exc)) from exc
    return CallOutcome(job_id, state)


def claim(db: Database, job_id: uuid.UUID, *, allow_running: bool = False) -> int | None:
    """Move a job to running for this process; returns the attempt number, or
    None if the job is final, unknown, or (unless ``allow_running``) already taken."""
    states = [CallStatus.QUEUED.value] + ([CallStatus.RUNNING.value] if allow_running else [])
    with db.session() as s:
        row = s.execute(
            update(Call)
            .where(Call.id == job_id, Call.status.in_(states), Call.attempts < MAX_ATTEMPTS)
            .values(
                status=CallStatus.RUNNING.value,
                attempts=Call.attempts + 1,
                started_at=utcnow(),
                worker=calls.worker_id(),
            )
            .returning(Call.attempts)
        ).first()
    if row is None:
        return None
    metrics.job_state(CallStatus.RUNNING.value)
    return int(row[0])


def run_job(
    job_id: str | uuid.UUID,
    db: Database,
    engine_provider: Callable[[], Engine],
    *,
    cancels: CancelRegistry | None = None,
    allow_running: bool = False,
) -> str | None:
    """Run one async job to a final state. Idempotent: a final job is never run
    again, and only the holder of the latest attempt may store a response.

    Returns the final status written by this run, or None if it did nothing.
    """
    job_uuid = uuid.UUID(str(job_id))
    with logs.log_context(job_id=str(job_uuid)):
        attempt = claim(db, job_uuid, allow_running=allow_running)
        if attempt is None:
            _fail_if_exhausted(db, job_uuid)
            log.info("job not runnable (final, taken or exhausted)")
            return None
        with db.session() as s:
            call = s.get(Call, job_uuid)
            assert call is not None
            request = calls.request_of(call)
            request_id = call.request_id
            waited = None
            if attempt == 1 and call.started_at is not None and call.created_at is not None:
                waited = (as_utc(call.started_at) - as_utc(call.created_at)).total_seconds()
        # the request that created the job: its log lines join this job's by request_id
        with logs.log_context(request_id=request_id):
            if waited is not None:
                metrics.job_queue_wait(waited)
            log.info("job started", extra={"attempt": attempt,
                                           "queue_wait_ms": None if waited is None else round(waited * 1000, 2)})
            status = _run_claimed(db, job_uuid, attempt, request, engine_provider, cancels)
            log.info("job finished", extra={"state": status or "superseded"})
            return status


def _run_claimed(db: Database, job_uuid: uuid.UUID, attempt: int, request, engine_provider, cancels) -> str | None:
    event = cancels.register(str(job_uuid)) if cancels else None
    try:
        engine = engine_provider()
        result = engine.generate(request, event)
    except ContextOverflow as exc:
        calls.record_failure(db, job_uuid, str(exc))
        return CallStatus.FAILED.value
    except EngineError as exc:
        log.warning("job failed: model error", extra={"error": str(exc)})
        calls.record_failure(db, job_uuid, f"model error: {exc}")
        return CallStatus.FAILED.value
    except Exception as exc:
        log.exception("job crashed")
        calls.record_failure(db, job_uuid, f"internal error: {type(exc).__name__}")
        return CallStatus.FAILED.value
    finally:
        if cancels:
            cancels.discard(str(job_uuid))
    if result.finish_reason == "cancelled":
        # cancelled by its owner while running: unit is kept (work was done), text kept
        calls.record_failure(
            db, job_uuid, "cancelled by the user", refund=False, status=CallStatus.CANCELLED, partial=result
        )
        return CallStatus.CANCELLED.value
    if calls.record_completion(db, job_uuid, result, attempt=attempt):
        log.info("job completed", extra={"prompt_tokens": result.prompt_tokens,
                                         "completion_tokens": result.completion_tokens,
                                         "model_seconds": round(result.generation_seconds, 4)})
        return CallStatus.COMPLETED.value
    return None


def _fail_if_exhausted(db: Database, job_id: uuid.UUID) -> None:
    with db.session() as s:
        call = s.get(Call, job_id)
        exhausted = (
            call is not None
            and call.status == CallStatus.QUEUED.value
            and call.attempts >= MAX_ATTEMPTS
        )
    if exhausted:
        calls.record_failure(db, job_id, f"gave up after {MAX_ATTEMPTS} attempts")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_orphan(call: Call, stale_seconds: int) -> bool:
    """A running call whose process is gone: dead pid on this host, or (for other
    hosts, which we cannot inspect) running for longer than ``stale_seconds``."""
    import socket

    started = as_utc(call.started_at)
    if started is None or started < utcnow() - timedelta(seconds=stale_seconds):
        return True
    if not call.worker:
        return True
    host, pid, _nonce = (call.worker.split(":") + ["", "", ""])[:3]
    if host == socket.gethostname() and pid.isdigit():
        return int(pid) != os.getpid() and not _pid_alive(int(pid))
    return False


def recover(db: Database, stale_seconds: int) -> tuple[list[str], int]:
    """After a crash: put orphaned running jobs back in the queue (or fail them,
    refunded, when out of attempts) and fail orphaned sync calls (refunded: the
    client never got its answer). Returns (job ids to enqueue, calls failed)."""
    to_enqueue: list[str] = []
    failed = 0
    with db.session() as s:
        running = s.scalars(select(Call).where(Call.status == CallStatus.RUNNING.value)).all()
        orphans = [c for c in running if is_orphan(c, stale_seconds)]
    for c in orphans:
        if c.kind == CallKind.ASYNC.value and c.attempts < MAX_ATTEMPTS:
            with db.session() as s:
                n = s.execute(
                    update(Call)
                    .where(Call.id == c.id, Call.status == CallStatus.RUNNING.value, Call.worker == c.worker)
                    .values(status=CallStatus.QUEUED.value, worker=None)
                ).rowcount
            if n:
                to_enqueue.append(str(c.id))
        else:
            reason = "interrupted by a server restart" if c.kind != CallKind.ASYNC.value else (
                f"gave up after {MAX_ATTEMPTS} attempts"
            )
            failed += int(calls.record_failure(db, c.id, reason))
    with db.session() as s:
        queued = s.scalars(
            select(Call.id).where(
                Call.status == CallStatus.QUEUED.value, Call.kind == CallKind.ASYNC.value
            ).order_by(Call.created_at)
        ).all()
    for job in queued:
        if str(job) not in to_enqueue:
            to_enqueue.append(str(job))
    return to_enqueue, failed


__all__ = ["CancelRegistry", "JobQueue", "QueueUnavailable", "recover", "run_job", "submit"]
