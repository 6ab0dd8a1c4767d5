"""The ledger of model calls: quota units and call rows.

Every call, whatever the route or worker, is admitted by :func:`open_call`
(a unit reserved and the row written in one transaction) and ends in
:func:`record_completion` or :func:`record_failure` (refunding the unit when
the failure is ours), so quotas, refunds and storage behave the same for sync,
async, streamed and OpenAI-style calls.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from ..db import Database, utcnow
from ..engine.base import Completion, EngineError, GenerationRequest, SamplingParams
from ..models import Call, CallKind, CallStatus, User
from ..observability import metrics
from . import quota
from .intent import CallIntent
from .quota import QuotaState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuotaPolicy:
    default_quota: int
    window_seconds: int | None


def prompt_text(request: GenerationRequest) -> str:
    """What goes in ``calls.prompt``: the seed's prompt, or the last user turn of a chat."""
    if request.prompt is not None:
        return request.prompt
    assert request.messages is not None
    users = [m.get("content", "") for m in request.messages if m.get("role") == "user"]
    return users[-1] if users else ""


def refuse_if_spent(db: Database, intent: CallIntent) -> None:
    """Raise QuotaExceeded, before any model work, when the quota read with the
    credentials is already spent (the reservation would refuse it anyway)."""
    if intent.quota is not None and intent.quota.remaining <= 0:
        exc = quota.QuotaExceeded(intent.quota)
        with db.session() as s:
            _refused(s, intent.user_id, intent.kind, exc)
        raise exc


def open_call(db: Database, intent: CallIntent, policy: QuotaPolicy, *, prompt_tokens: int | None,
              model: str, worker: str) -> tuple[uuid.UUID, QuotaState]:
    """Reserve a quota unit and write the call row in one committed transaction.

    Raises :class:`quota.QuotaExceeded` with nothing written when the user is
    out of quota.
    """
    with db.session() as s:
        try:
            state = quota.reserve(s, intent.user_id, policy.default_quota, policy.window_seconds)
        except quota.QuotaExceeded as exc:
            _refused(s, intent.user_id, intent.kind, exc)
            raise
        request = intent.request
        queued = intent.kind == CallKind.ASYNC
        call = Call(
            id=uuid.uuid4(),
            user_id=intent.user_id,
            kind=intent.kind.value,
            status=(CallStatus.QUEUED if queued else CallStatus.RUNNING).value,
            prompt=prompt_text(request),
            # the seed's single prompt is rebuilt from `prompt`; whole chats are kept as sent
            messages=list(request.messages) if intent.kind == CallKind.CHAT and request.messages else None,
            params={**request.params.to_dict(), **({"raw_prompt": True} if request.prompt is not None else {})},
            prompt_tokens=prompt_tokens,
            model=model,
            model_id=intent.model,
            request_id=intent.request_id,
            started_at=None if queued else utcnow(),
            worker=None if queued else worker,
            attempts=0 if queued else 1,
        )
        s.add(call)
    if queued:
        metrics.job_state(CallStatus.QUEUED.value)
    return call.id, state


def _refused(session: Session, user_id: int, kind: CallKind, exc: quota.QuotaExceeded) -> None:
    """One place for every route: a warning with the user name, and the counter."""
    username = session.scalar(select(User.username).where(User.id == user_id))
    log.warning("quota refused", extra={"user": username, "kind": kind.value, "quota_limit": exc.state.limit})
    metrics.quota_refused(kind.value)


def request_of(call: Call) -> GenerationRequest:
    """Rebuild the engine request stored in a call row (async jobs run from this)."""
    stored = dict(call.params or {})
    params = SamplingParams.from_dict(stored)
    if call.messages is not None:
        return GenerationRequest.chat(call.messages, params)
    if stored.get("raw_prompt"):
        return GenerationRequest(prompt=call.prompt, params=params)
    return GenerationRequest.single_prompt(call.prompt, params)


_RESULT_COLUMNS = ("status", "response", "finish_reason", "prompt_tokens", "completion_tokens", "model",
                   "finished_at")


def _record_statement(with_attempt: bool):
    # Built once with bound parameters: constructing the statement anew each time
    # cost more than the database round trip on this per-call hot path.
    cond = [Call.id == bindparam("call_id"), Call.status == CallStatus.RUNNING.value]
    if with_attempt:
        cond.append(Call.attempts == bindparam("attempt"))
    return (
        update(Call)
        .where(*cond)
        .values(**{col: bindparam(f"new_{col}") for col in _RESULT_COLUMNS})
        .returning(Call.kind)
    )


_RECORD = {False: _record_statement(False), True: _record_statement(True)}


def record_completion(db: Database, call_id: uuid.UUID, result: Completion, attempt: int | None = None) -> bool:
    """Store the response; only the current holder of a running call may (exactly one response)."""
    status = CallStatus.CANCELLED if result.finish_reason == "cancelled" else CallStatus.COMPLETED
    values = {
        "new_status": status.value,
        "new_response": result.text,
        "new_finish_reason": result.finish_reason,
        "new_prompt_tokens": result.prompt_tokens,
        "new_completion_tokens": result.completion_tokens,
        "new_model": result.model,
        "new_finished_at": utcnow(),
        "call_id": call_id,
        "attempt": attempt,
    }
    with db.autocommit() as conn:  # one statement: its own transaction
        row = conn.execute(_RECORD[attempt is not None], values).first()
    if row is None:
        return False
    # counted here, where a call becomes final exactly once, so every route and worker is covered
    metrics.observe_completion(row[0], result, status.value)
    if row[0] == CallKind.ASYNC.value:
        metrics.job_state(status.value)
    return True


def record_failure(
    db: Database,
    call_id: uuid.UUID,
    error: str,
    *,
    refund: bool = True,
    status: CallStatus = CallStatus.FAILED,
    partial: Completion | None = None,
    from_states: tuple[CallStatus, ...] = (CallStatus.QUEUED, CallStatus.RUNNING),
) -> bool:
    """Mark a call that is in one of ``from_states`` failed (or cancelled) and,
    if asked, give its unit back. False if it was in none of them."""
    values: dict[str, Any] = {"status": status.value, "error": error, "finished_at": utcnow()}
    if partial is not None:
        values.update(
            response=partial.text,
            finish_reason=partial.finish_reason,
            completion_tokens=partial.completion_tokens,
            prompt_tokens=partial.prompt_tokens,
        )
    with db.session() as s:
        row = s.execute(
            update(Call)
            .where(Call.id == call_id, Call.status.in_([st.value for st in from_states]))
            .values(**values)
            .returning(Call.kind)
        ).first()
        if row is not None and refund:
            quota.refund(s, call_id)
    if row is None:
        return False
    if partial is not None:
        metrics.observe_completion(row[0], partial, status.value)
    else:
        metrics.observe_failure(row[0], status.value)
    if row[0] == CallKind.ASYNC.value:
        metrics.job_state(status.value)
    return True


@contextmanager
def failures_recorded(db: Database, call_id: uuid.UUID) -> Iterator[None]:
    """Around engine work for an admitted call: any exception marks the call failed
    (its unit refunded, the server's fault) and propagates."""
    try:
        yield
    except EngineError as exc:
        record_failure(db, call_id, f"model error: {exc}")
        raise
    except BaseException as exc:
        record_failure(db, call_id, f"internal error: {type(exc).__name__}")
        raise
