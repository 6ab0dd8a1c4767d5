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
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import and_, case, false, func, or_, select, true
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..db import Database, as_utc, utcnow
from ..models import ApiKey, Call, CallStatus, UsageDaily, UsageDay, User

GROUPS = ("user", "key", "model", "day")

#: the figures of each row, in report (and CSV column) order
FIGURES = ("calls", "completed", "failed", "refunded", "prompt_tokens", "completion_tokens", "model_seconds")

ONE_DAY = timedelta(days=1)
EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC)
#: states a call can still leave (a day with one of these is not rolled up)
OPEN = (CallStatus.QUEUED.value, CallStatus.RUNNING.value)


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
    if dialect == "postgresql":  # a date (cheap per row; formatted once per group)
        return func.date(func.timezone("UTC", Call.created_at))
    return func.strftime("%Y-%m-%d", Call.created_at)


def _seconds(dialect: str):
    """Model time of a call: started to finished (NULL while it runs, or if it never started)."""
    if dialect == "postgresql":
        return func.extract("epoch", Call.finished_at - Call.started_at)
    return (func.julianday(Call.finished_at) - func.julianday(Call.started_at)) * 86400.0


def _count(condition):
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _figures(dialect: str) -> list:
    """The aggregate of each figure over ``calls``, in FIGURES order."""
    return [
        func.count().label("calls"),
        _count(Call.status == CallStatus.COMPLETED.value).label("completed"),
        _count(Call.status == CallStatus.FAILED.value).label("failed"),
        # a refunded call gave its quota unit back (failed through the server's fault, or cancelled while queued)
        _count(Call.charged.is_(False)).label("refunded"),
        func.coalesce(func.sum(Call.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(Call.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(_seconds(dialect)), 0).label("model_seconds"),
    ]


def _column(group_by: str, dialect: str):
    return {"user": Call.user_id, "key": Call.api_key_id, "model": Call.model_id, "day": _day(dialect)}[group_by]


def _key(value) -> str | None:
    """A group's value as the report shows it: ids as text, days as ISO dates, "" (rolled up) as None."""
    if value is None or value == "":
        return None
    return value.isoformat() if isinstance(value, date) else str(value)


Figures = dict[str | None, list[float]]


def _add(into: Figures, key: str | None, figures) -> None:
    have = into.setdefault(key, [0] * len(FIGURES))
    for i, v in enumerate(figures):
        # counts stay integers; seconds arrive as a float or (PostgreSQL's extract) a Decimal
        have[i] += float(v or 0) if FIGURES[i] == "model_seconds" else int(v or 0)


def _live(session: Session, group_by: str, where: list, out: Figures) -> None:
    dialect = session.get_bind().dialect.name
    group = _column(group_by, dialect).label("grp")
    for row in session.execute(select(group, *_figures(dialect)).where(*where).group_by(group)):
        _add(out, _key(row[0]), row[1:])


def _rolled(session: Session, group_by: str, spans: list[tuple[date, date]], out: Figures) -> None:
    if not spans:
        return
    # every call has exactly one model value (maybe none), so a day's model rows sum to the whole day
    dimension = "model" if group_by == "day" else group_by
    group = UsageDaily.day if group_by == "day" else UsageDaily.grp
    stmt = (select(group, *(func.sum(getattr(UsageDaily, f)) for f in FIGURES))
            .where(UsageDaily.dimension == dimension,
                   or_(*(and_(UsageDaily.day >= a, UsageDaily.day < b) for a, b in spans)))
            .group_by(group))
    for row in session.execute(stmt):
        _add(out, _key(row[0]), row[1:])


def _midnight(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def _spans(days: list[date]) -> list[tuple[date, date]]:
    """Sorted days as [first, after-last) runs of consecutive days."""
    spans: list[tuple[date, date]] = []
    for d in days:
        if spans and spans[-1][1] == d:
            spans[-1] = (spans[-1][0], d + ONE_DAY)
        else:
            spans.append((d, d + ONE_DAY))
    return spans


def report(session: Session, group_by: str, since: datetime | None = None, until: datetime | None = None,
           user_id: int | None = None) -> list[UsageRow]:
    """The report over ``[since, until)``, optionally of one user's calls only,
    one row per group (busiest first; by day, in date order).

    Whole days already rolled up (:func:`roll_up`) are read from ``usage_daily``;
    the rest of the range (today, yesterday, a day still running a job, the
    partial days at its ends) from ``calls``, through its ``created_at`` index.
    One user's report reads their calls directly (their own index)."""
    if group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {', '.join(GROUPS)}")
    # no call is outside these years; clamping keeps day arithmetic clear of datetime's limits
    since = None if since is None else min(max(as_utc(since), EARLIEST), LATEST)
    until = None if until is None else min(max(as_utc(until), EARLIEST), LATEST)
    figures: Figures = {}
    spans: list[tuple[date, date]] = []
    if user_id is None:
        first = None if since is None else (since + (ONE_DAY if since.time() != time() else timedelta())).date()
        stmt = select(UsageDay.day).order_by(UsageDay.day)
        if first is not None:
            stmt = stmt.where(UsageDay.day >= first)
        if until is not None:
            stmt = stmt.where(UsageDay.day < until.date())  # days that end by `until`
        spans = _spans(list(session.scalars(stmt)))
    _rolled(session, group_by, spans, figures)
    # the rest of [since, until), outside the rolled-up spans
    gaps, start = [], since
    for a, b in spans:
        gaps.append((start, _midnight(a)))
        start = _midnight(b)
    gaps.append((start, until))
    where = [or_(false(), *(and_(true(), *([Call.created_at >= lo] if lo is not None else []),
                                 *([Call.created_at < hi] if hi is not None else []))
                            for lo, hi in gaps if lo is None or hi is None or lo < hi))]
    if user_id is not None:
        where.append(Call.user_id == user_id)
    _live(session, group_by, where, figures)

    labels = _labels(session, group_by, [int(k) if group_by in ("user", "key") else k
                                         for k in figures if k is not None])
    out = []
    for key, f in figures.items():
        raw = int(key) if key is not None and group_by in ("user", "key") else key
        values = dict(zip(FIGURES, f, strict=True))
        out.append(UsageRow(group=key, label=labels.get(raw, _unlabelled(group_by, raw)),
                            **{k: int(v) for k, v in values.items() if k != "model_seconds"},
                            model_seconds=round(float(values["model_seconds"]), 3)))
    if group_by == "day":
        return sorted(out, key=lambda r: r.group or "")
    return sorted(out, key=lambda r: (-r.calls, r.label))


def user_totals(session: Session, user_ids: list[int]) -> dict[int, tuple[int, int, datetime | None]]:
    """(calls, prompt + completion tokens, last call) of each of these users, all time:
    rolled-up days from ``usage_daily``, the rest from ``calls``, the last call by an
    index lookup per user (the admin user list shows a page of these)."""
    if not user_ids:
        return {}
    spans = _spans(list(session.scalars(select(UsageDay.day).order_by(UsageDay.day))))
    figures: Figures = {}
    if spans:
        stmt = (select(UsageDaily.grp, *(func.sum(getattr(UsageDaily, f)) for f in FIGURES))
                .where(UsageDaily.dimension == "user", UsageDaily.grp.in_([str(i) for i in user_ids]),
                       or_(*(and_(UsageDaily.day >= a, UsageDaily.day < b) for a, b in spans)))
                .group_by(UsageDaily.grp))
        for row in session.execute(stmt):
            _add(figures, row[0], row[1:])
    outside = and_(true(), *(or_(Call.created_at < _midnight(a), Call.created_at >= _midnight(b)) for a, b in spans))
    dialect = session.get_bind().dialect.name
    for row in session.execute(select(Call.user_id, *_figures(dialect))
                               .where(Call.user_id.in_(user_ids), outside).group_by(Call.user_id)):
        _add(figures, str(row[0]), row[1:])
    last = select(func.max(Call.created_at)).where(Call.user_id == User.id).scalar_subquery()
    lasts = dict(session.execute(select(User.id, last).where(User.id.in_(user_ids))).all())
    calls_at, prompt_at, completion_at = (FIGURES.index(f) for f in ("calls", "prompt_tokens", "completion_tokens"))
    out = {}
    for uid in user_ids:
        f = figures.get(str(uid), [0] * len(FIGURES))
        out[uid] = (int(f[calls_at]), int(f[prompt_at] + f[completion_at]), as_utc(lasts.get(uid)))
    return out


def roll_up(db: Database, max_days: int = 7) -> int:
    """Roll up closed days not rolled up yet, oldest first, at most ``max_days`` per
    run; returns how many. A day is closed once it ended over a day ago *and* none
    of its calls is queued or running (a final call never changes again), so the
    rolled-up figures stay equal to the rows (a backlog is worked off a week per
    pass, so one pass never holds the housekeeping loop for long). Each day is one transaction whose
    ``usage_days`` row is the claim: a second process doing the same day fails its
    insert and moves on. Runs with the periodic housekeeping and before
    ``model-api usage``."""
    with db.session() as s:
        first = as_utc(s.scalar(select(func.min(Call.created_at))))
        if first is None:
            return 0
        last = utcnow().date() - 2 * ONE_DAY
        done = set(s.scalars(select(UsageDay.day).where(UsageDay.day >= first.date())))
    day, rolled = first.date(), 0
    while day <= last and rolled < max_days:
        if day not in done and _roll_up_day(db, day):
            rolled += 1
        day += ONE_DAY
    return rolled


def _roll_up_day(db: Database, day: date) -> bool:
    start, end = _midnight(day), _midnight(day + ONE_DAY)
    in_day = (Call.created_at >= start, Call.created_at < end)
    try:
        with db.session() as s:
            if s.scalar(select(Call.id).where(*in_day, Call.status.in_(OPEN)).limit(1)) is not None:
                return False  # a call of that day has not ended: later
            claim = UsageDay(day=day, calls=0)
            s.add(claim)
            s.flush()
            dialect = s.get_bind().dialect.name
            for dimension in ("user", "key", "model"):
                group = _column(dimension, dialect).label("grp")
                for row in s.execute(select(group, *_figures(dialect)).where(*in_day).group_by(group)):
                    values = dict(zip(FIGURES, row[1:], strict=True))
                    s.add(UsageDaily(day=day, dimension=dimension, grp="" if row[0] is None else str(row[0]),
                                     **{k: v or 0 for k, v in values.items()}))
                    if dimension == "model":
                        claim.calls += values["calls"]
    except IntegrityError:  # another process rolled this day up first
        return False
    return True


def _unlabelled(group_by: str, value) -> str:
    if value is None:
        return {"key": "(no key: password)", "model": "(no model)"}.get(group_by, "(none)")
    return str(value)


def _labels(session: Session, group_by: str, values: list) -> dict:
    if not values:
        return {}
    if group_by == "user":
        return dict(session.execute(select(User.id, User.username).where(User.id.in_(values))).all())
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


__all__ = ["FIGURES", "GROUPS", "UsageRow", "report", "roll_up", "to_csv", "totals", "user_totals"]
