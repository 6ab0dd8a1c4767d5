"""What operators do to users and keys, and what customers do to their own keys:
each change is written together with its audit row (``admin_events``: who, what,
when, from which request) in one transaction. No Flask: ``/admin``, ``/me``, the
console and the CLI share it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, contains_eager

from ..db import as_utc, utcnow
from ..models import AdminEvent, ApiKey, Call, User
from . import api_keys, quota, usage
from . import auth as auth_service
from .auth import ACCOUNT_COLUMNS, UserError


class NotFound(UserError):
    """No such user or key (or not one the caller may see: the same answer, so ids cannot be probed)."""


class Conflict(UserError):
    """A change that cannot be made in the current state (e.g. an admin deactivating themselves)."""


@dataclass(frozen=True)
class Actor:
    """Who makes a change: a signed-in user (None: the CLI) and the request's id."""

    user_id: int | None = None
    request_id: str | None = None


CLI = Actor()


def audit(session: Session, actor: Actor, action: str, target: str | None, **detail: Any) -> None:
    """Record a change in the caller's transaction, so the change and its record commit together."""
    session.add(AdminEvent(actor_id=actor.user_id, action=action, target=target,
                           detail={k: v for k, v in detail.items() if v is not None} or None,
                           request_id=actor.request_id))


# --- who is who ---------------------------------------------------------------------

def is_admin(conn: Connection | Session, user_id: int) -> bool:
    """Read on every admin request (not cached with the credentials), so a demoted
    or deactivated admin loses access with their next request."""
    return bool(conn.execute(select(User.is_admin).where(User.id == user_id, User.is_active.is_(True))).scalar())


def account(conn: Connection | Session, user_id: int) -> Row | None:
    """The active user's :data:`~.auth.ACCOUNT_COLUMNS` (and ``is_admin``) by id: a console session's user."""
    return conn.execute(select(*ACCOUNT_COLUMNS, User.is_admin)
                        .where(User.id == user_id, User.is_active.is_(True))).first()


# --- users -------------------------------------------------------------------------------

def user_view(user: User, st: quota.QuotaState, tokens: int = 0, calls: int = 0,
              last_call_at: datetime | None = None) -> dict[str, Any]:
    return {
        "username": user.username,
        "admin": user.is_admin,
        "active": user.is_active,
        "quota": {"limit": st.limit, "used": st.limit - st.remaining, "remaining": st.remaining,
                  "custom": user.quota is not None},
        "calls": calls,
        "tokens": tokens,
        "last_call_at": _iso(last_call_at),
        "models": user.allowed_models,
        # issue 14's limits, shown read-only here (null: the settings' default)
        "limits": {"rpm": user.rpm_limit, "tpm": user.tpm_limit, "concurrency": user.concurrency_limit,
                   "token_budget": user.token_budget, "tokens_used": user.tokens_used},
        "created_at": _iso(user.created_at),
    }


def list_users(session: Session, policy, limit: int, after: str | None = None,
               search: str | None = None) -> list[dict[str, Any]]:
    """Users by name, ``limit`` of them after the name ``after`` (a cursor), with
    each one's quota, call count, tokens and last call (:func:`.usage.user_totals`)."""
    stmt = select(User).order_by(User.username).limit(limit)
    if after is not None:
        stmt = stmt.where(User.username > after)
    if search:
        stmt = stmt.where(User.username.contains(search, autoescape=True))
    users = list(session.scalars(stmt))
    stats = usage.user_totals(session, [u.id for u in users])
    out = []
    for u in users:
        calls_, tokens, last = stats[u.id]
        out.append(user_view(u, quota.state_of_user(u, policy.default_quota, policy.window_seconds),
                             tokens, calls_, last))
    return out


def usernames(session: Session, limit: int = 500) -> list[str]:
    """Active users' names, for a picker."""
    return list(session.scalars(select(User.username).where(User.is_active.is_(True))
                                .order_by(User.username).limit(limit)))


def get_user(session: Session, username: str) -> User:
    if not auth_service.possible_username(username):  # NUL or too long: no such user (and no query)
        raise NotFound(f"no user {username[:150]!r}")
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFound(f"no user {username!r}")
    return user


def create_user(session: Session, actor: Actor, username: str, password: str, quota_: int | None = None,
                admin: bool = False) -> User:
    if session.scalar(select(User.id).where(User.username == username.strip())) is not None:
        raise Conflict(f"user {username.strip()!r} already exists")
    user = auth_service.create_user(session, username, password, quota_)
    user.is_admin = admin
    audit(session, actor, "user.create", user.username, quota=quota_, admin=admin or None)
    return user


def update_user(session: Session, actor: Actor, username: str, *, quota_: int | None = None,
                clear_quota: bool = False, reset_usage: bool = False, password: str | None = None,
                active: bool | None = None, admin: bool | None = None) -> User:
    """Change what is given; one audit row lists what changed (never the password)."""
    user = get_user(session, username)
    if actor.user_id == user.id and (active is False or admin is False):
        raise Conflict("you cannot deactivate or demote yourself (ask another admin)")
    changed: dict[str, Any] = {}
    if quota_ is not None or clear_quota:
        if quota_ is not None and quota_ < 0:
            raise UserError("quota must be >= 0")
        user.quota = quota_
        changed["quota"] = quota_
    if reset_usage:
        user.used = 0
        user.window_started_at = None
        changed["reset_usage"] = True
    if password is not None:
        auth_service.set_password(session, user.username, password)
        changed["password"] = "changed"
    if active is not None and active != user.is_active:
        user.is_active = active
        changed["active"] = active
    if admin is not None and admin != user.is_admin:
        user.is_admin = admin
        changed["admin"] = admin
    if changed:
        audit(session, actor, "user.update", user.username, **changed)
    return user


# --- keys --------------------------------------------------------------------------------

def key_view(k: ApiKey, username: str | None = None) -> dict[str, Any]:
    now = utcnow()
    expires = as_utc(k.expires_at)
    state = "revoked" if k.revoked_at else ("expired" if expires is not None and expires <= now else "active")
    return {
        "id": k.id,
        "user": username if username is not None else k.user.username,
        "name": k.name,
        "prefix": k.prefix,
        "state": state,
        "models": k.allowed_models,
        "created_at": _iso(k.created_at),
        "last_used_at": _iso(k.last_used_at),
        "expires_at": _iso(k.expires_at),
        "revoked_at": _iso(k.revoked_at),
        "limits": {"rpm": k.rpm_limit, "tpm": k.tpm_limit, "concurrency": k.concurrency_limit,
                   "token_budget": k.token_budget, "tokens_used": k.tokens_used, "priority": k.priority},
    }


def list_keys(session: Session, user_id: int | None = None, include_revoked: bool = False,
              limit: int = 100, after: int | None = None) -> list[ApiKey]:
    # each key's user comes with it (key_view names the owner): one query, not one per key
    stmt = select(ApiKey).join(User).options(contains_eager(ApiKey.user)).order_by(ApiKey.id).limit(limit)
    if user_id is not None:
        stmt = stmt.where(ApiKey.user_id == user_id)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    if after is not None:
        stmt = stmt.where(ApiKey.id > after)
    return list(session.scalars(stmt))


def create_key(session: Session, actor: Actor, user: User, name: str | None = None,
               expires_at: datetime | None = None, models: list[str] | None = None) -> tuple[api_keys.NewKey, ApiKey]:
    """A new key for ``user``; the secret is in the returned NewKey only."""
    if expires_at is not None and as_utc(expires_at) <= utcnow():
        raise UserError("expires_at must be in the future")
    new = api_keys.create_key(session, user, name, models)
    row = session.get(ApiKey, new.id)
    assert row is not None
    row.expires_at = expires_at
    audit(session, actor, "key.create", f"{user.username}/{new.id}", prefix=new.prefix, name=name,
          expires_at=_iso(expires_at), models=models)
    return new, row


def revoke_key(session: Session, actor: Actor, key_id: int, owner_id: int | None = None) -> ApiKey:
    """Revoke a key by id (only among ``owner_id``'s keys, if given); revoking twice is harmless."""
    # an id past the column's range cannot exist (and the database would refuse to compare it)
    row = session.get(ApiKey, key_id) if 0 < key_id < 2**31 else None
    if row is None or (owner_id is not None and row.user_id != owner_id):
        raise NotFound(f"no API key {key_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        audit(session, actor, "key.revoke", f"{row.user.username}/{row.id}", prefix=row.prefix)
    return row


# --- the audit log and calls, for support ---------------------------------------------------

def event_view(e: AdminEvent, actor: str | None) -> dict[str, Any]:
    return {"id": e.id, "at": _iso(e.created_at), "actor": actor, "action": e.action, "target": e.target,
            "detail": e.detail, "request_id": e.request_id}


def events(session: Session, limit: int, before: int | None = None) -> list[dict[str, Any]]:
    """The newest audit rows first; ``before``: the last id of the previous page."""
    stmt = (select(AdminEvent, User.username).outerjoin(User, User.id == AdminEvent.actor_id)
            .order_by(AdminEvent.id.desc()).limit(limit))
    if before is not None:
        stmt = stmt.where(AdminEvent.id < before)
    return [event_view(e, name) for e, name in session.execute(stmt)]


def calls(session: Session, limit: int, *, user_id: int | None = None, status: str | None = None,
          since: datetime | None = None, before: uuid.UUID | None = None) -> list[tuple[Call, str]]:
    """Calls (with their user's name), newest first, filtered; ``before``: the last
    id of the previous page (a cursor on created_at, id: stable while calls arrive)."""
    stmt = select(Call, User.username).join(User, User.id == Call.user_id)
    if user_id is not None:
        stmt = stmt.where(Call.user_id == user_id)
    if status is not None:
        stmt = stmt.where(Call.status == status)
    if since is not None:
        stmt = stmt.where(Call.created_at >= since)
    if before is not None:
        anchor = session.execute(select(Call.created_at, Call.id).where(Call.id == before)).first()
        if anchor is None:
            return []
        stmt = stmt.where((Call.created_at < anchor.created_at)
                          | ((Call.created_at == anchor.created_at) & (Call.id < anchor.id)))
    return [(c, name) for c, name in session.execute(stmt.order_by(Call.created_at.desc(), Call.id.desc()).limit(limit))]


def me(session: Session, user_id: int, policy) -> dict[str, Any]:
    """What a customer sees of their account: quota now and when its window renews."""
    user = session.get(User, user_id)
    if user is None:
        raise NotFound("no such user")
    st = quota.state_of_user(user, policy.default_quota, policy.window_seconds)
    renews_at = None
    started = as_utc(user.window_started_at)
    if policy.window_seconds is not None and started is not None and st.limit - st.remaining > 0:
        renews_at = _iso(started + timedelta(seconds=policy.window_seconds))
    return {"username": user.username, "admin": user.is_admin,
            "quota": {"limit": st.limit, "used": st.limit - st.remaining, "remaining": st.remaining,
                      "window_seconds": policy.window_seconds, "renews_at": renews_at},
            "models": user.allowed_models}


def _iso(value: datetime | None) -> str | None:
    return as_utc(value).isoformat() if value is not None else None
