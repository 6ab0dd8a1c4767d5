"""What a user may read back: their calls and jobs, and nobody else's."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select

from ..db import Database, as_utc
from ..models import Call, CallKind, CallStatus

#: ``GET /jobs?state=``: the seed's ``processing`` or one detailed state
JOB_STATE_FILTERS: dict[str, tuple[str, ...]] = {
    "processing": (CallStatus.QUEUED.value, CallStatus.RUNNING.value),
    **{st.value: (st.value,) for st in CallStatus},
}


def _iso(value) -> str | None:
    """UTC with an explicit offset, whichever database stored it (SQLite drops the zone)."""
    return as_utc(value).isoformat() if value is not None else None


def job_view(call: Call) -> dict[str, Any]:
    """An async job as ``/async_call_status``, ``GET /jobs`` and its webhook show it."""
    status = CallStatus(call.status)
    out: dict[str, Any] = {
        "job_id": str(call.id),
        "job_status": status.seed_status,
        "state": status.value,
        "response": call.response if status == CallStatus.COMPLETED else None,
        "created_at": _iso(call.created_at),
        "finished_at": _iso(call.finished_at),
    }
    if status == CallStatus.CANCELLED:
        out["response"] = call.response
    if status in (CallStatus.FAILED, CallStatus.CANCELLED):
        out["error"] = call.error
    if status == CallStatus.RUNNING and call.cancel_requested:
        out["cancel_requested"] = True
    if call.completion_tokens is not None:
        out["usage"] = {"prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
                        "total_tokens": (call.prompt_tokens or 0) + call.completion_tokens}
    return out


class History:
    def __init__(self, db: Database):
        self.db = db

    def call(self, call_id: uuid.UUID, user_id: int) -> Call | None:
        """The call if it exists *and* belongs to the user; None otherwise (callers
        answer both cases with the same 404 so ids cannot be probed)."""
        with self.db.session() as s:
            return s.scalar(select(Call).where(Call.id == call_id, Call.user_id == user_id))

    def job(self, job_id: uuid.UUID, user_id: int) -> Call | None:
        """The user's async job of that id, or None."""
        call = self.call(job_id, user_id)
        return call if call is not None and call.kind == CallKind.ASYNC.value else None

    def page(self, user_id: int, limit: int, before: uuid.UUID | None = None) -> list[Call]:
        """The user's calls, newest first; ``before`` is the id of the last call of the previous page."""
        return self._page(select(Call).where(Call.user_id == user_id), user_id, limit, before)

    def jobs(self, user_id: int, limit: int, before: uuid.UUID | None = None,
             state: str | None = None) -> list[Call]:
        """The user's async jobs, newest first, optionally in one of ``JOB_STATE_FILTERS``' states."""
        stmt = select(Call).where(Call.user_id == user_id, Call.kind == CallKind.ASYNC.value)
        if state is not None:
            stmt = stmt.where(Call.status.in_(JOB_STATE_FILTERS[state]))
        return self._page(stmt, user_id, limit, before)

    def _page(self, stmt, user_id: int, limit: int, before: uuid.UUID | None) -> list[Call]:
        with self.db.session() as s:
            if before is not None:
                anchor = s.scalar(select(Call).where(Call.id == before, Call.user_id == user_id))
                if anchor is None:
                    return []
                stmt = stmt.where((Call.created_at < anchor.created_at)
                                  | ((Call.created_at == anchor.created_at) & (Call.id < anchor.id)))
            return list(s.scalars(stmt.order_by(Call.created_at.desc(), Call.id.desc()).limit(limit)))
