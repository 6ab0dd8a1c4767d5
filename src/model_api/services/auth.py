"""Users and credentials. No Flask: the CLI, the web app and workers share it."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Row, bindparam, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from ..models import User

# OWASP Password Storage Cheat Sheet minimum for argon2id: m=19 MiB, t=2, p=1.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16)

USERNAME_MAX = 150


class UserError(ValueError):
    """A user-management request that cannot be carried out (bad name, duplicate...)."""


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


class CredentialCache:
    """Remembers recently verified credentials so repeat calls skip argon2.

    Verifying argon2id costs tens of milliseconds by design; a paying client
    calling many times a second should not pay it on every request.  The key is
    an HMAC (with a per-process or configured secret) over the username, the
    password *and the stored hash*: a password change alters the stored hash,
    so old entries can never match again, and nothing reversible is kept.
    """

    def __init__(self, secret: bytes | None = None, ttl: float = 60.0, max_entries: int = 10_000):
        self._secret = secret or secrets.token_bytes(32)
        self._ttl = ttl
        self._max = max_entries
        self._entries: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def _key(self, username: str, password: str, password_hash: str) -> bytes:
        msg = b"\0".join(s.encode() for s in (username, password, password_hash))
        return hmac.new(self._secret, msg, hashlib.sha256).digest()

    def hit(self, username: str, password: str, password_hash: str) -> bool:
        key = self._key(username, password, password_hash)
        with self._lock:
            expires = self._entries.get(key)
            if expires is None:
                return False
            if expires < time.monotonic():
                del self._entries[key]
                return False
            return True

    def add(self, username: str, password: str, password_hash: str) -> None:
        key = self._key(username, password, password_hash)
        with self._lock:
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[key] = time.monotonic() + self._ttl


#: what a credential check hands back: who the caller is, their quota counters
#: (so a caller visibly out of quota is refused before any model work), the
#: models they may use and their limits (services/limits.py)
ACCOUNT_COLUMNS = (User.id, User.username, User.quota, User.used, User.window_started_at, User.allowed_models,
                   User.rpm_limit, User.tpm_limit, User.concurrency_limit, User.token_budget)

# built once: this runs on every request
_ACCOUNT_BY_NAME = select(*ACCOUNT_COLUMNS, User.is_active, User.password_hash).where(
    User.username == bindparam("username"))


def authenticate(
    conn: Connection | Session, username: str, password: str, cache: CredentialCache | None = None
) -> Row | None:
    """The active user with these credentials (a row of :data:`ACCOUNT_COLUMNS`), or None.

    One indexed select of plain columns: it runs on every request."""
    row = conn.execute(_ACCOUNT_BY_NAME, {"username": username}).first()
    if row is None or not row.is_active:
        # Spend comparable time so a missing name is not distinguishable by timing.
        verify_password(_DUMMY_HASH, password)
        return None
    if cache is not None and cache.hit(username, password, row.password_hash):
        return row
    if not verify_password(row.password_hash, password):
        return None
    if cache is not None:
        cache.add(username, password, row.password_hash)
    return row


def create_user(session: Session, username: str, password: str, quota: int | None = None) -> User:
    username = username.strip()
    if not username or len(username) > USERNAME_MAX or ":" in username or "\x00" in username:
        raise UserError(f"username must be 1-{USERNAME_MAX} characters without ':' or NUL")
    if len(password) < 8:
        raise UserError("password must be at least 8 characters")
    if quota is not None and quota < 0:
        raise UserError("quota must be >= 0")
    if _find_user(session, username) is not None:
        raise UserError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), quota=quota)
    session.add(user)
    session.flush()
    return user


def _find_user(session: Session, username: str) -> User | None:
    return session.scalar(select(User).where(User.username == username))


def get_user(session: Session, username: str) -> User:
    user = _find_user(session, username)
    if user is None:
        raise UserError(f"no user {username!r}")
    return user


def set_password(session: Session, username: str, password: str) -> None:
    if len(password) < 8:
        raise UserError("password must be at least 8 characters")
    get_user(session, username).password_hash = hash_password(password)


def possible_username(username: str) -> bool:
    """Whether a user could have this name (what ``create_user`` accepts and the database stores)."""
    return 0 < len(username) <= USERNAME_MAX and "\x00" not in username


def generate_password() -> str:
    return secrets.token_urlsafe(18)


_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))
