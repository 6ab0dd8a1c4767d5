"""Async jobs: rows first, then a queue entry carrying only the job id.

``run_job(job_id)`` is the single entry point used by both the in-process
executor and the Celery task, so the two paths cannot drift apart.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

from sqlalchemy import func, select, update

from .. import process
from ..db import Database, as_utc, utcnow
from ..engine.base import ContextOverflow, EngineError, GenerationRequest
from ..engine.registry import EngineRegistry, UnknownModel
from ..models import Call, CallKind, CallStatus
from ..observability import logs, metrics
from .calls import CallOutcome, admit, start_generation, with_limits
from .intent import CallIntent
from .ledger import Ledger, QuotaPolicy, open_call, record_failure, refuse_if_spent, request_of, reservation
from .limits import AccountLimits, Limiter, account_limits

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


class QueueUnavailable(Exception):
    """The job could not be handed to a queue (broker down, queue full)."""


class JobQueue(Protocol):
    def enqueue(self, job_id: str) -> None: ...


class CancelRegistry:
    """Cancel events of the jobs running in this process, by job id.

    With a database, a watcher thread polls ``calls.cancel_requested`` for the
    registered jobs every ``poll_seconds`` and sets their events: that is how
    ``/async_call_cancel`` served by one process stops a job generating in
    another (a Celery worker, possibly on another machine). The in-process
    executor uses the same path, plus :meth:`cancel` as a shortcut.
    """

    def __init__(self, db: Database | None = None, poll_seconds: float = 0.5) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._db = db
        self._poll = poll_seconds
        self._watcher_pid: int | None = None  # threads do not survive fork: restart in children

    def register(self, job_id: str) -> threading.Event:
        """The event ``engine.generate`` watches for this job (set on cancel)."""
        with self._lock:
            ev = self._events.setdefault(job_id, threading.Event())
            if self._db is not None and self._watcher_pid != os.getpid():
                self._watcher_pid = os.getpid()
                threading.Thread(target=self._watch, name="cancel-watcher", daemon=True).start()
        return ev

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._events.pop(job_id, None)

    def cancel(self, job_id: str) -> bool:
        """Set the job's event if it runs in this process; True if it does."""
        with self._lock:
            ev = self._events.get(job_id)
        if ev is not None:
            ev.set()
        return ev is not None

    def poll_once(self) -> int:
        """Set the events of registered jobs whose row asks for cancellation."""
        with self._lock:
            ids = [uuid.UUID(j) for j, ev in self._events.items() if not ev.is_set()]
        if not ids or self._db is None:
            return 0
        with self._db.session() as s:
            wanted = s.scalars(select(Call.id).where(Call.id.in_(ids), Call.cancel_requested.is_(True))).all()
        for job in wanted:
            self.cancel(str(job))
        return len(wanted)

    def _watch(self) -> None:
        while True:
            time.sleep(self._poll)
            try:
                self.poll_once()
            except Exception:  # a database blip must not kill the watcher; the next poll retries
                log.warning("cancel watcher could not poll the database", exc_info=True)


class JobNotFound(Exception):
    """No such async job for this user (callers answer 404 either way)."""


class JobFinished(Exception):
    """The job already reached a final state; it cannot be cancelled."""

    def __init__(self, state: str):
        super().__init__(f"job is already {state}")
        self.state = state


class Jobs:
    """Async jobs: submitted here, run by whichever process takes the id off the queue."""

    def __init__(self, ledger: Ledger, engines: EngineRegistry, policy: QuotaPolicy,
                 queue: Callable[[], JobQueue], cancels: CancelRegistry, worker: Callable[[], str],
                 limiter: Limiter | None = None):
        self.limiter = limiter
        self.ledger = ledger
        self.db = ledger.db
        self.engines = engines
        self.policy = policy
        self._queue = queue  # a provider: the queue is built on first use, and it needs run()
        self.cancels = cancels
        self.worker = worker

    def submit(self, intent: CallIntent) -> CallOutcome:
        """Charge, store the job row, commit, and only then enqueue its id.

        A quota visibly spent and a prompt that cannot fit are refused first,
        nothing charged or written. If the queue refuses, the job is failed with
        its unit refunded and QueueUnavailable is raised: nothing stays
        'processing' for ever.
        """
        refuse_if_spent(self.db, intent)
        intent = with_limits(self.db, intent)
        engine = self.engines.get(intent.model)
        prompt = engine.prepare(intent.request)
        # counted against the rates now (the job's tokens are given back when it ends, wherever it runs)
        admission = admit(self.limiter, intent, prompt.n_tokens)
        try:
            job_id, state = open_call(self.db, intent, self.policy, prompt_tokens=prompt.n_tokens,
                                      model=engine.model_name, worker=self.worker())
        except BaseException:
            admission.settle(0)
            raise
        try:
            queue = self._queue()
            for_user = getattr(queue, "enqueue_for", None)  # a queue that serves users in turn
            if for_user is not None:  # weighted by the API key's priority, as a sync call is
                tenant = intent.request.tenant
                for_user(str(job_id), intent.user_id, tenant.weight if tenant is not None else 1)
            else:
                queue.enqueue(str(job_id))
        except Exception as exc:
            record_failure(self.db, job_id, f"could not enqueue: {exc}")
            admission.settle(0)
            raise QueueUnavailable(str(exc)) from exc
        return CallOutcome(job_id, state, rates=admission.state)

    def claim(self, job_id: uuid.UUID, *, allow_running: bool = False) -> Call | None:
        """Move a job to running for this process; returns the claimed row (its
        ``attempts`` is this run's number), or None if the job is final, unknown, or
        (unless ``allow_running``) already taken."""
        states = [CallStatus.QUEUED.value] + ([CallStatus.RUNNING.value] if allow_running else [])
        with self.db.session() as s:
            call = s.execute(
                update(Call)
                .where(Call.id == job_id, Call.status.in_(states), Call.attempts < MAX_ATTEMPTS)
                .values(
                    status=CallStatus.RUNNING.value,
                    attempts=Call.attempts + 1,
                    started_at=utcnow(),
                    worker=self.worker(),
                )
                .returning(Call)  # the row the run needs, in the same round trip
            ).scalar_one_or_none()
        if call is None:
            return None
        metrics.job_state(CallStatus.RUNNING.value)
        return call

    def run(self, job_id: str | uuid.UUID, *, allow_running: bool = False) -> str | None:
        """Run one async job to a final state. Idempotent: a final job is never run
        again, and only the holder of the latest attempt may store a response.
        The in-process executor and the Celery task both call this.

        Returns the final status written by this run, or None if it did nothing.
        """
        job_uuid = uuid.UUID(str(job_id))
        with logs.log_context(job_id=str(job_uuid)):
            call = self.claim(job_uuid, allow_running=allow_running)
            if call is None:
                _fail_if_exhausted(self.db, job_uuid)
                log.info("job not runnable (final, taken or exhausted)")
                return None
            waited = None
            if call.attempts == 1 and call.started_at is not None and call.created_at is not None:
                waited = (as_utc(call.started_at) - as_utc(call.created_at)).total_seconds()
            # the request that created the job: its log lines join this job's by request_id
            with logs.log_context(request_id=call.request_id):
                if call.cancel_requested:
                    # asked to stop while an earlier attempt ran, then that process died
                    self.ledger.fail(job_uuid, "cancelled by the user", refund=False, status=CallStatus.CANCELLED)
                    log.info("job finished", extra={"state": CallStatus.CANCELLED.value})
                    return CallStatus.CANCELLED.value
                if waited is not None:
                    metrics.job_queue_wait(waited)
                log.info("job started", extra={"attempt": call.attempts,
                                               "queue_wait_ms": None if waited is None else round(waited * 1000, 2)})
                status = self._run_claimed(call)
                log.info("job finished", extra={"state": status or "superseded"})
                return status

    def _run_claimed(self, call: Call) -> str | None:
        job_uuid = call.id
        event = self.cancels.register(str(job_uuid))
        try:
            # the model the job was submitted to (rows from before MODELS_FILE: the default),
            # or when it fails before its first token the fallbacks it was submitted with
            # its caller's limits, read once: the key's priority now, the tpm give-back at the end
            with self.db.session() as s:
                limits = account_limits(s, call.user_id, call.api_key_id)
            request = request_of(call, limits.priority)
            intent = CallIntent(user_id=call.user_id, request=request, kind=CallKind.ASYNC,
                                model=call.model_id, fallbacks=tuple(call.params.get("fallbacks") or ()))
            # incremental although read to the end: a running job can be cancelled, and a remote
            # upstream's stream stops at its next line and leaves the text produced so far
            answered, _, _, gen = start_generation(self.engines, intent, event, incremental=True)
            if answered != call.model_id:  # the row names the model that answers, as a sync call's does
                with self.db.session() as s:
                    s.execute(update(Call).where(Call.id == job_uuid).values(model_id=answered))
            for _ in gen:
                pass
            result = gen.result
            assert result is not None
        except UnknownModel as exc:  # the models file changed since the job was queued
            record_failure(self.db, job_uuid, f"the model {exc.model_id!r} is no longer served")
            return CallStatus.FAILED.value
        except ContextOverflow as exc:
            self.ledger.fail(job_uuid, str(exc))
            return CallStatus.FAILED.value
        except EngineError as exc:
            log.warning("job failed: model error", extra={"error": str(exc)})
            self.ledger.fail(job_uuid, f"model error: {exc}")
            return CallStatus.FAILED.value
        except Exception as exc:
            log.exception("job crashed")
            self.ledger.fail(job_uuid, f"internal error: {type(exc).__name__}")
            return CallStatus.FAILED.value
        finally:
            self.cancels.discard(str(job_uuid))
        self._give_back_tokens(call, request, limits, result.prompt_tokens + result.completion_tokens)
        if result.finish_reason == "cancelled":
            # cancelled by its owner while running: unit is kept (work was done), text kept
            self.ledger.fail(job_uuid, "cancelled by the user", refund=False, status=CallStatus.CANCELLED,
                             partial=result)
            return CallStatus.CANCELLED.value
        if self.ledger.complete(job_uuid, result, attempt=call.attempts) is not False:  # None: deferred
            log.info("job completed", extra={"prompt_tokens": result.prompt_tokens,
                                             "completion_tokens": result.completion_tokens,
                                             "model_seconds": round(result.generation_seconds, 4)})
            return CallStatus.COMPLETED.value
        return None

    def _give_back_tokens(self, call: Call, request: GenerationRequest, limits: AccountLimits, used: int) -> None:
        """The tokens-per-window share of the job's reservation it did not use,
        given back by whichever process ran it (its budget settles with its row)."""
        if self.limiter is None:
            return
        # what admission reserved (calls.reserved_tokens is the budget's share, set only under a budget)
        reserved = reservation(call.prompt_tokens, request)
        if reserved > used:
            self.limiter.give_back(call.user_id, call.api_key_id, limits, reserved - used)

    def cancel(self, job_id: uuid.UUID, user_id: int) -> str:
        """Cancel the user's async job. Returns the state it is now in:

        * ``cancelled``: it was queued; it will never run and its unit is refunded;
        * ``running``: it is generating; ``cancel_requested`` is set and the process
          running it stops at the next token (the unit is kept: work was done) —
          the state turns ``cancelled`` within about CANCEL_POLL_SECONDS.

        Raises JobNotFound (unknown or another user's job) or JobFinished.
        """
        # Retried: the job may move from queued to running between the read and the write.
        for _ in range(3):
            with self.db.session() as s:
                state = s.scalar(select(Call.status).where(
                    Call.id == job_id, Call.user_id == user_id, Call.kind == CallKind.ASYNC.value))
            if state is None:
                raise JobNotFound(str(job_id))
            if state == CallStatus.QUEUED.value:
                # conditional on queued: a worker that claimed it meanwhile keeps it
                if record_failure(self.db, job_id, "cancelled by the user", status=CallStatus.CANCELLED,
                                  from_states=(CallStatus.QUEUED,)):
                    return CallStatus.CANCELLED.value
            elif state == CallStatus.RUNNING.value:
                with self.db.session() as s:
                    done = s.execute(
                        update(Call)
                        .where(Call.id == job_id, Call.status == CallStatus.RUNNING.value)
                        .values(cancel_requested=True)
                    ).rowcount
                if done:
                    self.cancels.cancel(str(job_id))  # in-process shortcut; other processes poll the flag
                    return CallStatus.RUNNING.value
            else:
                raise JobFinished(state)
        raise JobFinished(state)  # pragma: no cover - only under a pathological state flip-flop

    def reconcile(self, stale_seconds: int, requeue_after: int | None) -> None:
        """Re-queue (or fail, refunded) what a crash left behind (see :func:`recover`)."""
        ids, failed = recover(self.db, stale_seconds, requeue_after)
        for job_id in ids:
            try:
                self._queue().enqueue(job_id)
            except Exception:
                log.exception("could not re-enqueue recovered job", extra={"job_id": job_id})
        if ids or failed:
            log.info("recovered jobs", extra={"requeued": len(ids), "failed": failed})


def _fail_if_exhausted(db: Database, job_id: uuid.UUID) -> None:
    with db.session() as s:
        call = s.get(Call, job_id)
        exhausted = (
            call is not None
            and call.status == CallStatus.QUEUED.value
            and call.attempts >= MAX_ATTEMPTS
        )
    if exhausted:
        record_failure(db, job_id, f"gave up after {MAX_ATTEMPTS} attempts")


def is_orphan(call: Call, stale_seconds: int) -> bool:
    """A running call whose process is gone: dead pid on this host, or (for other
    hosts, which we cannot inspect) running for longer than ``stale_seconds``."""
    started = as_utc(call.started_at)
    if started is None or started < utcnow() - timedelta(seconds=stale_seconds):
        return True
    if not call.worker:
        return True
    return process.dead_here(call.worker) is True


def recover(db: Database, stale_seconds: int, requeue_after: int | None = None) -> tuple[list[str], int]:
    """Reconcile the database with the queue. Returns (job ids to enqueue, calls failed).

    * orphaned running calls (their process is gone): async jobs go back to
      ``queued`` (or are failed, refunded, when out of attempts; or cancelled if
      their owner asked); sync calls are failed and refunded (the client never
      got its answer);
    * queued jobs out of attempts are failed and refunded;
    * queued jobs are returned for enqueueing: all of them when
      ``requeue_after`` is None (the in-process queue died with its process),
      otherwise only those last enqueued more than ``requeue_after`` seconds ago
      (a broker keeps its messages; these lost theirs). Each such job's
      ``enqueued_at`` is claimed with a conditional UPDATE, so concurrent
      sweepers on several workers enqueue it once.
    """
    to_enqueue: list[str] = []
    failed = 0
    with db.session() as s:
        running = s.scalars(select(Call).where(Call.status == CallStatus.RUNNING.value)).all()
        orphans = [c for c in running if is_orphan(c, stale_seconds)]
    for c in orphans:
        if c.kind == CallKind.ASYNC.value and c.cancel_requested:
            failed += int(record_failure(
                db, c.id, "cancelled by the user", refund=False, status=CallStatus.CANCELLED
            ))
        elif c.kind == CallKind.ASYNC.value and c.attempts < MAX_ATTEMPTS:
            with db.session() as s:
                n = s.execute(
                    update(Call)
                    .where(Call.id == c.id, Call.status == CallStatus.RUNNING.value, Call.worker == c.worker)
                    .values(status=CallStatus.QUEUED.value, worker=None, enqueued_at=utcnow())
                ).rowcount
            if n:
                metrics.job_state(CallStatus.QUEUED.value)  # back in the queue for another attempt
                to_enqueue.append(str(c.id))
        else:
            reason = "interrupted by a server restart" if c.kind != CallKind.ASYNC.value else (
                f"gave up after {MAX_ATTEMPTS} attempts"
            )
            failed += int(record_failure(db, c.id, reason))
    queued_async = (Call.status == CallStatus.QUEUED.value, Call.kind == CallKind.ASYNC.value)
    with db.session() as s:
        exhausted = s.scalars(select(Call.id).where(*queued_async, Call.attempts >= MAX_ATTEMPTS)).all()
    for job in exhausted:
        failed += int(record_failure(db, job, f"gave up after {MAX_ATTEMPTS} attempts"))
    with db.session() as s:
        if requeue_after is None:
            queued = s.scalars(select(Call.id).where(*queued_async).order_by(Call.created_at)).all()
        else:
            cutoff = utcnow() - timedelta(seconds=requeue_after)
            last = func.coalesce(Call.enqueued_at, Call.created_at)
            stale = s.scalars(select(Call.id).where(*queued_async, last < cutoff).order_by(Call.created_at)).all()
            queued = []
            for job in stale:
                n = s.execute(
                    update(Call)
                    .where(Call.id == job, *queued_async, last < cutoff)
                    .values(enqueued_at=utcnow())
                    .execution_options(synchronize_session=False)
                ).rowcount
                if n:
                    queued.append(job)
    for job in queued:
        if str(job) not in to_enqueue:
            to_enqueue.append(str(job))
    return to_enqueue, failed


__all__ = ["CancelRegistry", "JobFinished", "JobNotFound", "JobQueue", "Jobs", "QueueUnavailable", "recover"]

