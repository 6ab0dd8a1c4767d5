"""What a user may read back: their calls and jobs, and nobody else's."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from ..db import Database
from ..models import Call, CallKind


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
        stmt = select(Call).where(Call.user_id == user_id)
        with self.db.session() as s:
            if before is not None:
                anchor = s.scalar(select(Call).where(Call.id == before, Call.user_id == user_id))
                if anchor is None:
                    return []
                stmt = stmt.where((Call.created_at < anchor.created_at)
                                  | ((Call.created_at == anchor.created_at) & (Call.id < anchor.id)))
            return list(s.scalars(stmt.order_by(Call.created_at.desc(), Call.id.desc()).limit(limit)))
