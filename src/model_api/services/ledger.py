"""The ledger of model calls: quota units and call rows.

Every call, whatever the route or worker, is admitted by :func:`open_call`
(a unit reserved and the row written in one transaction) and ends in
:func:`record_completion` or :func:`record_failure` (refunding the unit when
the failure is ours), so quotas, refunds and storage behave the same for sync,
async, streamed and OpenAI-style calls.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import bindparam, exc as sa_exc, insert, select, update
from sqlalchemy.orm import Session

from ..db import Database, utcnow
from ..engine.base import UNSTORABLE, Completion, EngineError, GenerationRequest, SamplingParams, Tenant
from ..models import Call, CallKind, CallStatus, User, WebhookDelivery
from ..observability import metrics
from . import quota
from .intent import CallIntent
from .limits import BudgetExceeded, account_limits, reserve_budget, settle_budget
from .quota import QuotaState
from .webhooks import arm as arm_webhook

log = logging.getLogger(__name__)


#: what a database that is down, refusing connections, timing out or out of
#: pooled connections raises (as opposed to a bug in a statement)
DATABASE_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached or did not answer in time
    (refused or timed-out connection, lost connection, statement timeout, pool
    exhausted) rather than that our SQL was wrong."""
    if isinstance(exc, sa_exc.TimeoutError):  # no pooled connection free within pool_timeout
        return True
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):  # connect failed / timed out,
        return True  # statement_timeout, server gone, connection closed under us
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


class DeferredWrites:
    """A call's final write that the database refused, kept until it answers.

    The model's work is done and (for a sync or streamed call) already on its
    way to the client, so losing the write would leave the row ``running`` and
    the unit charged for ever, and failing the request would throw the reply
    away. So the write waits here, in order, and a thread of this process
    retries every ``retry_seconds`` until the database takes it. A write whose
    process dies first is found by the next reconciler pass (a dead process's
    running row is failed and refunded).
    """

    def __init__(self, retry_seconds: float = 2.0) -> None:
        self.retry_seconds = retry_seconds
        self._writes: collections.deque[tuple[Callable[[], Any], str]] = collections.deque()
        self._lock = threading.Lock()
        self._retrier: threading.Thread | None = None

    def attempt(self, write: Callable[[], Any], what: str) -> Any:
        """Run ``write``; if the database is unavailable, keep it for later and return None."""
        try:
            return write()
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            log.warning("database unavailable; write deferred", extra={"write": what, "error": type(exc).__name__})
            with self._lock:
                self._writes.append((write, what))
                if self._retrier is None or not self._retrier.is_alive():
                    self._retrier = threading.Thread(target=self._retry, name="deferred-writes", daemon=True)
                    self._retrier.start()
            return None

    def _retry(self) -> None:
        while len(self):
            time.sleep(self.retry_seconds)
            if self.flush():
                log.info("deferred writes applied", extra={"left": len(self)})

    def flush(self) -> int:
        """Apply the kept writes in order, stopping at the first the database
        still refuses. Returns how many were applied."""
        done = 0
        while True:
            with self._lock:
                if not self._writes:
                    return done
                write, what = self._writes[0]
            try:
                write()
            except Exception as exc:
                if database_unavailable(exc):
                    return done
                # a write that can never succeed must not block the others
                log.exception("deferred write failed; dropped", extra={"write": what})
            with self._lock:
                self._writes.popleft()
            done += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._writes)


@dataclass(frozen=True)
class QuotaPolicy:
    default_quota: int
    window_seconds: int | None
    #: tokens each user may use in total unless set per user (None: no budget)
    default_token_budget: int | None = None


def reservation(prompt_tokens: int | None, request: GenerationRequest) -> int:
    """The most tokens a call can use: its prompt plus ``max_tokens`` (what token
    budgets and tokens-per-minute limits hold until the call ends)."""
    return (prompt_tokens or 0) + max(0, request.params.max_tokens)


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
    """Reserve a quota unit and the call's tokens (token budgets) and write the
    call row in one committed transaction.

    Raises :class:`quota.QuotaExceeded` or :class:`BudgetExceeded` with nothing
    charged or written when the user (or key) is out of quota or budget.
    """
    request = intent.request
    with db.session() as s:
        # only a call some budget applies to reserves tokens (and so settles when it ends):
        # without budgets, the common case, the call costs no extra statements
        reserved = reservation(prompt_tokens, request) if _budgeted(s, intent, policy) else None
        try:
            state = quota.reserve(s, intent.user_id, policy.default_quota, policy.window_seconds)
            if reserved is not None:
                reserve_budget(s, intent.user_id, intent.api_key_id, reserved, policy.default_token_budget)
        except (quota.QuotaExceeded, BudgetExceeded) as exc:
            s.rollback()  # the unit, if one was taken, goes back with the refusal
            _refused(s, intent.user_id, intent.kind, exc)
            raise
        queued = intent.kind == CallKind.ASYNC
        call_id = uuid.uuid4()
        # one INSERT on the session's connection, not an ORM object: the unit of work's
        # flush of a single new row cost more than the INSERT itself on this hot path
        s.connection().execute(_INSERT_CALL, dict(
            id=call_id,
            user_id=intent.user_id,
            kind=intent.kind.value,
            status=(CallStatus.QUEUED if queued else CallStatus.RUNNING).value,
            prompt=prompt_text(request),
            # the seed's single prompt is rebuilt from `prompt`; whole chats are kept as sent
            messages=list(request.messages) if intent.kind == CallKind.CHAT and request.messages else None,
            params={**request.params.to_dict(), **({"raw_prompt": True} if request.prompt is not None else {}),
                    # a queued job tries them as a sync call would (services/jobs.py)
                    **({"fallbacks": list(intent.fallbacks)} if queued and intent.fallbacks else {})},
            prompt_tokens=prompt_tokens,
            model=storable_name(model),
            model_id=intent.model,
            request_id=intent.request_id,
            api_key_id=intent.api_key_id,
            started_at=None if queued else utcnow(),
            worker=None if queued else worker,
            attempts=0 if queued else 1,
            reserved_tokens=reserved,
        ))
        if intent.callback_url:  # the job's webhook outbox row, committed with the job
            s.add(WebhookDelivery(call_id=call_id, url=intent.callback_url))
    if queued:
        metrics.job_state(CallStatus.QUEUED.value)
    return call_id, state


_INSERT_CALL = insert(Call)


def _budgeted(session: Session, intent: CallIntent, policy: QuotaPolicy) -> bool:
    """Whether a token budget applies to the call's user or key: the default one, or
    their own as read with the credentials (read here for calls made otherwise)."""
    if policy.default_token_budget is not None:
        return True
    limits = intent.limits or account_limits(session, intent.user_id, intent.api_key_id)
    return limits.user.token_budget is not None or (limits.key is not None and limits.key.token_budget is not None)


def _refused(session: Session, user_id: int, kind: CallKind, exc: quota.QuotaExceeded | BudgetExceeded) -> None:
    """One place for every route: a warning with the user name, and the counter."""
    username = session.scalar(select(User.username).where(User.id == user_id))
    if isinstance(exc, BudgetExceeded):
        log.warning("token budget refused", extra={"user": username, "kind": kind.value, "budget_of": exc.whose,
                                                   "token_budget": exc.budget})
    else:
        log.warning("quota refused", extra={"user": username, "kind": kind.value, "quota_limit": exc.state.limit})
    metrics.quota_refused(kind.value)


def request_of(call: Call, weight: int = 1) -> GenerationRequest:
    """Rebuild the engine request stored in a call row (async jobs run from this);
    ``weight``: its API key's priority in the fair scheduler."""
    stored = dict(call.params or {})
    params = SamplingParams.from_dict(stored)
    if call.messages is not None:
        request = GenerationRequest.chat(call.messages, params)
    elif stored.get("raw_prompt"):
        request = GenerationRequest(prompt=call.prompt, params=params)
    else:
        request = GenerationRequest.single_prompt(call.prompt, params)
    return replace(request, tenant=Tenant(call.user_id, weight))  # served in turn with its user's other calls


def storable_text(text: str) -> str:
    """A model's text as every database keeps it: NUL (PostgreSQL's text refuses it)
    and unpaired surrogates become U+FFFD. A call's row must be written whatever the
    model said: a refused write left it running, and charged."""
    return UNSTORABLE.sub("\ufffd", text)


_MODEL_CHARS = Call.__table__.c.model.type.length


def storable_name(name: str) -> str:
    """A model's name as the ``calls.model`` column keeps it: storable text, cut to the
    column's length. A remote upstream names its model as it likes (in its /models list
    and in every reply), and a name the column refuses failed the call's write, as an
    unstorable reply did."""
    return storable_text(name)[:_MODEL_CHARS]


_RESULT_COLUMNS = ("status", "response", "finish_reason", "prompt_tokens", "completion_tokens", "model",
                   "finished_at")


#: what a call's final write returns: its kind, for the metrics, and what settling its tokens needs
_FINAL = (Call.kind, Call.user_id, Call.api_key_id, Call.reserved_tokens, Call.created_at)


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
        .returning(*_FINAL)
    )


def _settle(conn, row, used_tokens: int) -> None:
    """Settle a finished call's token reservation to ``used_tokens``; ``row``: what
    its final write returned (``_FINAL``). Runs in that write's transaction, and a
    call reaches a final state once: settled once."""
    if row is not None and row.reserved_tokens is not None:
        settle_budget(conn, row.user_id, row.api_key_id, used_tokens - row.reserved_tokens, row.created_at)


_RECORD = {False: _record_statement(False), True: _record_statement(True)}


def record_completion(db: Database, call_id: uuid.UUID, result: Completion, attempt: int | None = None) -> bool:
    """Store the response; only the current holder of a running call may (exactly one response)."""
    status = CallStatus.CANCELLED if result.finish_reason == "cancelled" else CallStatus.COMPLETED
    values = {
        "new_status": status.value,
        "new_response": storable_text(result.text),
        "new_finish_reason": result.finish_reason,
        "new_prompt_tokens": result.prompt_tokens,
        "new_completion_tokens": result.completion_tokens,
        "new_model": storable_name(result.model),
        "new_finished_at": utcnow(),
        "call_id": call_id,
        "attempt": attempt,
    }
    with db.session() as s:  # the end, the token settlement and a job's webhook commit together
        row = s.connection().execute(_RECORD[attempt is not None], values).first()
        _settle(s.connection(), row, result.prompt_tokens + result.completion_tokens)
        if row is not None and attempt is not None:
            arm_webhook(s, call_id)
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
    values: dict[str, Any] = {"status": status.value, "error": storable_text(error), "finished_at": utcnow()}
    if partial is not None:
        values.update(
            response=storable_text(partial.text),
            finish_reason=partial.finish_reason,
            completion_tokens=partial.completion_tokens,
            prompt_tokens=partial.prompt_tokens,
        )
    with db.session() as s:
        row = s.execute(
            update(Call)
            .where(Call.id == call_id, Call.status.in_([st.value for st in from_states]))
            .values(**values)
            .returning(*_FINAL)
        ).first()
        # a refunded call costs no tokens; a cancelled one what it had used
        used = partial.prompt_tokens + partial.completion_tokens if partial is not None and not refund else 0
        _settle(s.connection(), row, used)
        if row is not None and refund:
            quota.refund(s, call_id)
        if row is not None and row[0] == CallKind.ASYNC.value:
            arm_webhook(s, call_id)  # the job's end and its webhook commit together
    if row is None:
        return False
    if partial is not None:
        metrics.observe_completion(row[0], partial, status.value)
    else:
        metrics.observe_failure(row[0], status.value)
    if row[0] == CallKind.ASYNC.value:
        metrics.job_state(status.value)
    return True


class Ledger:
    """The final writes of the calls this process runs: recorded now, or
    deferred (:class:`DeferredWrites`) while the database is unavailable."""

    def __init__(self, db: Database):
        self.db = db
        self.deferred = DeferredWrites()

    def complete(self, call_id: uuid.UUID, result: Completion, attempt: int | None = None) -> bool | None:
        """:func:`record_completion`; None when deferred."""
        return self.deferred.attempt(lambda: record_completion(self.db, call_id, result, attempt),
                                     f"complete {call_id}")

    def fail(self, call_id: uuid.UUID, error: str, **kwargs: Any) -> bool | None:
        """:func:`record_failure`; None when deferred."""
        return self.deferred.attempt(lambda: record_failure(self.db, call_id, error, **kwargs), f"fail {call_id}")

    @contextmanager
    def failures_recorded(self, call_id: uuid.UUID) -> Iterator[None]:
        """Around engine work for an admitted call: any exception marks the call
        failed (its unit refunded, the server's fault) and propagates."""
        try:
            yield
        except EngineError as exc:
            self.fail(call_id, f"model error: {exc}")
            raise
        except BaseException as exc:
            self.fail(call_id, f"internal error: {type(exc).__name__}")
            raise
