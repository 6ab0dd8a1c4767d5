"""Per-user API keys for ``Authorization: Bearer`` (no Flask: CLI and web share it).

A key is ``mk-`` + 43 URL-safe characters (256 random bits). It is shown once
at creation; the database keeps only its SHA-256 (a fast hash is right for a
high-entropy secret: there is nothing to brute-force, and verification costs
microseconds on every request) and a short prefix for listings.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from sqlalchemy import Row, bindparam, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from ..db import as_utc, utcnow
from ..models import ApiKey, User
from .auth import ACCOUNT_COLUMNS, UserError

KEY_PREFIX = "mk-"
#: characters of the key kept in clear for listings ("mk-" + 8 random characters)
SHOWN_PREFIX = len(KEY_PREFIX) + 8


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    id: int
    key: str  # the only time the full key exists outside the client
    prefix: str


def create_key(session: Session, user: User, name: str | None = None, models: list[str] | None = None) -> NewKey:
    """Create a key for ``user`` (limited to ``models`` ids within the user's, if
    given); the returned ``key`` is not stored anywhere."""
    if name is not None and len(name) > 100:
        raise UserError("key name must be at most 100 characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(user_id=user.id, name=name, prefix=key[:SHOWN_PREFIX], key_hash=hash_key(key),
                 allowed_models=None if models is None else sorted(set(models)))
    session.add(row)
    session.flush()
    return NewKey(row.id, key, row.prefix)


def list_keys(session: Session, user: User | None = None, include_revoked: bool = False) -> list[ApiKey]:
    """Keys (of one user, or everyone's), oldest first."""
    q = select(ApiKey).join(User).order_by(ApiKey.id)
    if user is not None:
        q = q.where(ApiKey.user_id == user.id)
    if not include_revoked:
        q = q.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(q))


def revoke_key(session: Session, ident: str) -> ApiKey:
    """Revoke a key given its id or its listed prefix; raises UserError if none or ambiguous."""
    ident = ident.strip()
    if ident.isdigit():
        rows = list(session.scalars(select(ApiKey).where(ApiKey.id == int(ident))))
    else:
        rows = list(session.scalars(select(ApiKey).where(ApiKey.prefix == ident[:SHOWN_PREFIX])))
    rows = [r for r in rows if r.revoked_at is None] or rows
    if not rows:
        raise UserError(f"no API key {ident!r}")
    if len(rows) > 1:
        raise UserError(f"{ident!r} matches {len(rows)} keys; revoke by id")
    row = rows[0]
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


# Built once with bound parameters: this runs on every request made with a key, and
# building the statement anew cost several times the database's own work.
_ACCOUNT_BY_KEY = (
    select(*ACCOUNT_COLUMNS, ApiKey.id.label("key_id"), ApiKey.last_used_at,
           ApiKey.allowed_models.label("key_models"), ApiKey.rpm_limit.label("key_rpm_limit"),
           ApiKey.tpm_limit.label("key_tpm_limit"), ApiKey.concurrency_limit.label("key_concurrency_limit"),
           ApiKey.token_budget.label("key_token_budget"), ApiKey.priority.label("key_priority"))
    .join(User)
    .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None), User.is_active.is_(True),
           # an expired key is refused like a revoked one
           or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > bindparam("now", type_=ApiKey.expires_at.type)))
)


def authenticate(conn: Connection | Session, key: str) -> Row | None:
    """The active user owning this unrevoked key (a row of
    :data:`~.auth.ACCOUNT_COLUMNS`), or None."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    now = utcnow()
    row = conn.execute(_ACCOUNT_BY_KEY, {"key_hash": hash_key(key), "now": now}).first()
    if row is None:
        return None
    last = as_utc(row.last_used_at)
    # a write per request would serialise busy clients on one row; minute resolution is plenty
    if last is None or (now - last).total_seconds() > 60:
        conn.execute(update(ApiKey).where(ApiKey.id == row.key_id).values(last_used_at=now))
    return row
