"""Model calls: admission (quota + row in one transaction), running, recording.

Every call, whatever the route, goes through :func:`admit` and ends in
:func:`record_completion` or :func:`record_failure`, so quotas, refunds and
storage behave the same for sync, async, streamed and OpenAI-style calls.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from ..db import Database, utcnow
from ..engine.base import Completion, Engine, EngineError, Generation, GenerationRequest
from ..models import Call, CallKind, CallStatus, User
from ..observability import metrics
from . import quota
from .quota import QuotaState

log = logging.getLogger(__name__)

#: identifies this process in ``calls.worker`` so a restart can tell its own
#: orphans (dead pid on this host) from calls another live process is running
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def worker_id() -> str:
    # recomputed after fork (gunicorn, Celery prefork) so children differ
    global WORKER_ID
    host, pid, nonce = WORKER_ID.split(":")
    if int(pid) != os.getpid():
        WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return WORKER_ID


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


def admit(
    session: Session,
    user_id: int,
    request: GenerationRequest,
    kind: CallKind,
    policy: QuotaPolicy,
    *,
    prompt_tokens: int | None,
    model: str,
    request_id: str | None = None,
) -> tuple[Call, QuotaState]:
    """Reserve a quota unit and write the call row, in the caller's transaction.

    Raises :class:`quota.QuotaExceeded` (nothing written) when the user is out of quota.
    """
    try:
        state = quota.reserve(session, user_id, policy.default_quota, policy.window_seconds)
    except quota.QuotaExceeded as exc:
        _refused(session, user_id, kind, exc)
        raise
    queued = kind == CallKind.ASYNC
    p = request.params
    call = Call(
        id=uuid.uuid4(),
        user_id=user_id,
        kind=kind.value,
        status=(CallStatus.QUEUED if queued else CallStatus.RUNNING).value,
        prompt=prompt_text(request),
        # the seed's single prompt is rebuilt from `prompt`; whole chats are kept as sent
        messages=list(request.messages) if kind == CallKind.CHAT and request.messages else None,
        params={
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "seed": p.seed,
            "stop": list(p.stop),
            **({"raw_prompt": True} if request.prompt is not None else {}),
        },
        prompt_tokens=prompt_tokens,
        model=model,
        request_id=request_id,
        started_at=None if queued else utcnow(),
        worker=None if queued else worker_id(),
        attempts=0 if queued else 1,
    )
    session.add(call)
    session.flush()
    if queued:
        metrics.job_state(CallStatus.QUEUED.value)
    return call, state


def _refused(session: Session, user_id: int, kind: CallKind, exc: quota.QuotaExceeded) -> None:
    """One place for every route: a warning with the user name, and the counter."""
    username = session.scalar(select(User.username).where(User.id == user_id))
    log.warning("quota refused", extra={"user": username, "kind": kind.value, "quota_limit": exc.state.limit})
    metrics.quota_refused(kind.value)


def open_call(
    db: Database,
    engine: Engine,
    user_id: int,
    request: GenerationRequest,
    kind: CallKind,
    policy: QuotaPolicy,
    request_id: str | None = None,
    prompt_tokens: int | None = None,
) -> tuple[uuid.UUID, QuotaState, int | None]:
    """Check the prompt fits (unless its ``prompt_tokens`` are already known),
    then charge a unit and write the row in one committed transaction.
    Returns (call id, quota state, prompt tokens).

    ContextOverflow is raised before anything is charged or written;
    QuotaExceeded leaves nothing written either.
    """
    if prompt_tokens is None:
        prompt_tokens = engine.check(request)
    with db.session() as s:
        call, state = admit(
            s, user_id, request, kind, policy, prompt_tokens=prompt_tokens, model=engine.model_name,
            request_id=request_id,
        )
        return call.id, state, prompt_tokens


def start_call(
    db: Database,
    engine: Engine,
    user_id: int,
    request: GenerationRequest,
    kind: CallKind,
    policy: QuotaPolicy,
    *,
    request_id: str | None = None,
    quota_hint: QuotaState | None = None,
    cancel: threading.Event | None = None,
) -> tuple[Generation, uuid.UUID, QuotaState, int]:
    """Start the model on a call, then charge a unit and write the row while it
    reads the prompt. Returns (generation, call id, quota state, prompt tokens).

    The database work overlaps the model's prompt processing instead of
    delaying it; nothing is lost by that order:

    * ContextOverflow, a quota already spent according to ``quota_hint`` (read
      with the credentials) and EngineBusy are raised before anything is
      started, charged or written;
    * the atomic reservation still decides: if it finds no unit left (a
      concurrent call took the last one) or the database fails, the generation
      is cancelled -- at the engine's next step -- and the error propagates,
      with nothing charged or written.
    """
    prompt_tokens = engine.check(request)
    if quota_hint is not None and quota_hint.remaining <= 0:
        exc = quota.QuotaExceeded(quota_hint)
        with db.session() as s:
            _refused(s, user_id, kind, exc)
        raise exc
    gen = engine.stream(request, cancel)
    try:
        call_id, state, _ = open_call(db, engine, user_id, request, kind, policy, request_id, prompt_tokens)
    except BaseException:
        gen.close()
        raise
    return gen, call_id, state, prompt_tokens


def request_of(call: Call) -> GenerationRequest:
    """Rebuild the engine request stored in a call row (async jobs run from this)."""
    from ..engine.base import SamplingParams

    p = dict(call.params or {})
    params = SamplingParams(
        max_tokens=int(p.get("max_tokens", 128)),
        temperature=float(p.get("temperature", 0.7)),
        top_p=float(p.get("top_p", 0.95)),
        seed=p.get("seed"),
        stop=tuple(p.get("stop") or ()),
    )
    if call.messages is not None:
        return GenerationRequest.chat(call.messages, params)
    if p.get("raw_prompt"):
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


class CallOutcome:
    """What a route needs to shape its reply."""

    def __init__(self, call_id: uuid.UUID, quota_state: QuotaState, completion: Completion | None = None):
        self.call_id = call_id
        self.quota = quota_state
        self.completion = completion


def run_sync(
    db: Database,
    engine: Engine,
    user_id: int,
    request: GenerationRequest,
    policy: QuotaPolicy,
    *,
    kind: CallKind = CallKind.SYNC,
    request_id: str | None = None,
    cancel: threading.Event | None = None,
    quota_hint: QuotaState | None = None,
) -> CallOutcome:
    """Admit, generate and record one synchronous call.

    Raises ContextOverflow, QuotaExceeded or EngineBusy with nothing charged or
    written (see :func:`start_call`); EngineError after recording the failure
    and refunding the unit.
    """
    gen, call_id, state, _ = start_call(db, engine, user_id, request, kind, policy, request_id=request_id,
                                        quota_hint=quota_hint, cancel=cancel)
    with failures_recorded(db, call_id):
        for _ in gen:
            pass
    assert gen.result is not None
    record_completion(db, call_id, gen.result)
    return CallOutcome(call_id, state, gen.result)


class StreamingCall:
    """A call whose text is consumed as it is generated (SSE routes).

    Made by :func:`start_stream`, which has already admitted it and produced
    the first delta, so every error that can be reported with a status code
    has been. Iterate for the deltas; when they end the row is completed.
    :meth:`cancel` (the client went away) stops the model and records what was
    produced: status ``cancelled``, ``finish_reason`` ``cancelled``, and the
    quota unit is **kept** (the model worked for the client; only failures on
    our side are refunded). A failure after the first delta is recorded and
    refunded, then re-raised for the route to report in-stream.
    """

    def __init__(self, db: Database, call_id: uuid.UUID, quota_state: QuotaState, gen, model: str,
                 prompt_tokens: int | None):
        self.db = db
        self.call_id = call_id
        self.quota = quota_state
        self.model = model
        self._gen = gen
        self._prompt_tokens = prompt_tokens
        self._first: str | None = None
        self._pieces: list[str] = []
        self._done = False
        self.result: Completion | None = None

    def _prime(self) -> None:
        """Run the model up to its first delta (or to its end)."""
        try:
            self._first = next(self._gen)
        except StopIteration:
            self._first = None

    def __iter__(self) -> Iterator[str]:
        try:
            # _first is None when the model ended before producing any text
            if self._first is not None:
                self._pieces.append(self._first)
                yield self._first
                for piece in self._gen:
                    self._pieces.append(piece)
                    yield piece
        except EngineError as exc:
            self._done = True
            record_failure(self.db, self.call_id, f"model error: {exc}", partial=self._partial("error"))
            raise
        result = self._gen.result
        assert result is not None
        self.result = result
        self._done = True
        record_completion(self.db, self.call_id, result)

    def _partial(self, reason: str) -> Completion:
        text = "".join(self._pieces)
        return Completion(text=text, prompt_tokens=self._prompt_tokens or 0,
                          completion_tokens=len(self._pieces), finish_reason=reason, model=self.model)

    def cancel(self, why: str = "client disconnected") -> None:
        """Stop the model and record the call as cut short (idempotent; no-op once finished)."""
        if self._done:
            return
        self._done = True
        try:
            self._gen.close()
        except Exception:  # the engine is stopping anyway; the row must still be written
            log.exception("closing a generation failed")
        result = self._gen.result
        if result is None or result.finish_reason != "cancelled":
            result = self._partial("cancelled")
        self.result = result
        record_failure(self.db, self.call_id, why, refund=False, status=CallStatus.CANCELLED, partial=result)


def start_stream(
    db: Database,
    engine: Engine,
    user_id: int,
    request: GenerationRequest,
    policy: QuotaPolicy,
    *,
    kind: CallKind,
    request_id: str | None = None,
    quota_hint: QuotaState | None = None,
) -> StreamingCall:
    """Admit a streamed call and run it to its first delta.

    Raises like :func:`run_sync` (ContextOverflow/QuotaExceeded/EngineBusy
    before charging; EngineError recorded and refunded) for everything that
    happens before the first token, so routes can still answer those with a
    status code.
    """
    gen, call_id, state, prompt_tokens = start_call(db, engine, user_id, request, kind, policy,
                                                    request_id=request_id, quota_hint=quota_hint,
                                                    cancel=threading.Event())
    with failures_recorded(db, call_id):
        sc = StreamingCall(db, call_id, state, gen, engine.model_name, prompt_tokens)
        sc._prime()
    return sc


def get_call_for_user(session: Session, call_id: uuid.UUID, user_id: int) -> Call | None:
    """The call if it exists *and* belongs to the user; None otherwise (callers
    answer both cases with the same 404 so ids cannot be probed)."""
    return session.scalar(select(Call).where(Call.id == call_id, Call.user_id == user_id))


def history(session: Session, user_id: int, limit: int, before: uuid.UUID | None = None) -> list[Call]:
    """The user's calls, newest first; ``before`` is the id of the last call of the previous page."""
    stmt = select(Call).where(Call.user_id == user_id)
    if before is not None:
        anchor = session.scalar(select(Call).where(Call.id == before, Call.user_id == user_id))
        if anchor is None:
            return []
        stmt = stmt.where(
            (Call.created_at < anchor.created_at) | ((Call.created_at == anchor.created_at) & (Call.id < anchor.id))
        )
    return list(session.scalars(stmt.order_by(Call.created_at.desc(), Call.id.desc()).limit(limit)))
