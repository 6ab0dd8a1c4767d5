"""The usage report: calls, outcomes, tokens and model time, grouped by user, API
key, model or day, over a time range. One ``GROUP BY`` over ``calls`` (its
``created_at`` indexes bound the range), then the names of the few groups are
looked up. No Flask: ``GET /admin/usage``, ``GET /me/usage``, the console and
``model-api usage`` all print this.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from ..db import as_utc
from ..models import ApiKey, Call, CallStatus, User

GROUPS = ("user", "key", "model", "day")

#: the figures of each row, in report (and CSV column) order
FIGURES = ("calls", "completed", "failed", "refunded", "prompt_tokens", "completion_tokens", "model_seconds")


@dataclass(frozen=True)
class UsageRow:
    #: the group: a user id, key id, model id or ISO day; None for calls without one
    #: (Basic-auth calls have no key; calls refused before routing have no model)
    group: str | None
    #: what a reader calls the group: the username, "mk-abc12345 (label)", the model id, the day
    label: str
    calls: int
    completed: int
    failed: int
    refunded: int
    prompt_tokens: int
    completion_tokens: int
    model_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def _day(dialect: str):
    # UTC days: timestamps are stored in UTC on both databases
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", Call.created_at), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", Call.created_at)


def _seconds(dialect: str):
    """Model time of a call: started to finished (NULL while it runs, or if it never started)."""
    if dialect == "postgresql":
        return func.extract("epoch", Call.finished_at - Call.started_at)
    return (func.julianday(Call.finished_at) - func.julianday(Call.started_at)) * 86400.0


def _count(condition):
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def report(session: Session, group_by: str, since: datetime | None = None, until: datetime | None = None,
           user_id: int | None = None) -> list[UsageRow]:
    """The report over ``[since, until)``, optionally of one user's calls only,
    one row per group (busiest first; by day, in date order)."""
    if group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {', '.join(GROUPS)}")
    dialect = session.get_bind().dialect.name
    column = {"user": Call.user_id, "key": Call.api_key_id, "model": Call.model_id, "day": _day(dialect)}[group_by]
    group = column.label("grp")
    stmt = select(
        group,
        func.count().label("calls"),
        _count(Call.status == CallStatus.COMPLETED.value).label("completed"),
        _count(Call.status == CallStatus.FAILED.value).label("failed"),
        # a refunded call gave its quota unit back (failed through the server's fault, or cancelled while queued)
        _count(Call.charged.is_(False)).label("refunded"),
        func.coalesce(func.sum(Call.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(Call.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(_seconds(dialect)), 0).label("model_seconds"),
    ).group_by(group)
    if since is not None:
        stmt = stmt.where(Call.created_at >= since)
    if until is not None:
        stmt = stmt.where(Call.created_at < until)
    if user_id is not None:
        stmt = stmt.where(Call.user_id == user_id)
    rows = session.execute(stmt).all()
    labels = _labels(session, group_by, [r.grp for r in rows if r.grp is not None])
    out = [UsageRow(group=None if r.grp is None else str(r.grp), label=labels.get(r.grp, _unlabelled(group_by, r.grp)),
                    calls=int(r.calls), completed=int(r.completed), failed=int(r.failed), refunded=int(r.refunded),
                    prompt_tokens=int(r.prompt_tokens), completion_tokens=int(r.completion_tokens),
                    model_seconds=round(float(r.model_seconds), 3))
           for r in rows]
    if group_by == "day":
        return sorted(out, key=lambda r: r.group or "")
    return sorted(out, key=lambda r: (-r.calls, r.label))


def _unlabelled(group_by: str, value) -> str:
    if value is None:
        return {"key": "(no key: password)", "model": "(no model)"}.get(group_by, "(none)")
    return str(value)


def _labels(session: Session, group_by: str, values: list) -> dict:
    if not values:
        return {}
    if group_by == "user":
        return dict(session.execute(select(User.id, User.username).where(User.id.in_(values))).tuples().all())
    if group_by == "key":
        rows = session.execute(select(ApiKey.id, ApiKey.prefix, ApiKey.name).where(ApiKey.id.in_(values))).all()
        return {r.id: f"{r.prefix}" + (f" ({r.name})" if r.name else "") for r in rows}
    return {}


def totals(rows: list[UsageRow]) -> dict[str, float]:
    """The figures summed over every group."""
    return {f: sum(getattr(r, f) for r in rows) for f in FIGURES}


def _cell(value) -> str:
    """A CSV cell a spreadsheet will not run: text starting with = + - @ (or a tab or
    CR) is a formula to Excel and LibreOffice, so it is quoted with a leading '."""
    text = "" if value is None else str(value)
    if text and text[0] in "=+-@\t\r" and not _is_number(text):
        return "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def to_csv(rows: list[UsageRow], group_by: str) -> str:
    """The report as CSV for billing: one header line, one line per group."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([group_by, "label", *FIGURES])
    for r in rows:
        w.writerow([_cell(r.group), _cell(r.label), *(getattr(r, f) for f in FIGURES)])
    return buf.getvalue()


def iso(value: datetime | None) -> str | None:
    return as_utc(value).isoformat() if value is not None else None


__all__ = ["FIGURES", "GROUPS", "UsageRow", "report", "to_csv", "totals"]
