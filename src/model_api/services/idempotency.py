"""``Idempotency-Key``: a retried POST replays the first response instead of running again.

The semantics of the IETF httpapi draft, as Stripe popularised them, scoped per
user: the first request with a key *claims* it (one INSERT against the unique
``(user_id, key)`` pair, so across processes and API nodes exactly one claim
wins: there is no read-then-insert window), runs, and stores its response. A
repeat with the same key and the same request replays that response; a repeat
while the first still runs is told so (409, retry later); the same key with a
different request is refused (422). Only successful (2xx) responses are
stored: an error charged nothing (failures are refunded), so the key is
released and a retry runs again. A stored response is kept for
IDEMPOTENCY_TTL_SECONDS; after that the key runs a new request.

A claim whose holder died (its process is gone on this host, or it has held
the key for longer than ``stale_seconds``) is taken over by the next request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, delete, insert, or_, select, update

from .. import process
from ..db import Database, as_utc, utcnow
from ..models import IdempotencyKey

log = logging.getLogger(__name__)

_T = IdempotencyKey.__table__

#: seconds a client is told to wait before retrying a key whose first request still runs
RETRY_AFTER = 1


class RequestInProgress(Exception):
    """The key's first request has not finished yet (409, retry after a moment)."""

    retry_after = RETRY_AFTER


class KeyReused(Exception):
    """The key was used with a different request (422)."""


@dataclass(frozen=True)
class Claim:
    """This request holds the key: run it, then :meth:`Idempotency.finish` or :meth:`Idempotency.release`."""

    id: int
    token: str


@dataclass(frozen=True)
class Replay:
    """The stored response of the key's first request."""

    status: int
    body: Any
    headers: dict[str, str]
    id: int = 0
    token: str = ""


def fingerprint(method: str, path: str, body: Any) -> str:
    """What makes two requests "the same": method, path and the JSON body with its
    keys sorted (so spacing and key order do not matter)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def _insert_if_absent(dialect: str):
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(_T).on_conflict_do_nothing(index_elements=["user_id", "key"])
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(_T).on_conflict_do_nothing(index_elements=["user_id", "key"])
    return insert(_T).prefix_with("OR IGNORE")  # pragma: no cover - only PostgreSQL and SQLite are supported


class Idempotency:
    def __init__(self, db: Database, ttl_seconds: int, stale_seconds: int, worker: Callable[[], str]):
        self.db = db
        self.ttl = timedelta(seconds=ttl_seconds)
        self.stale = timedelta(seconds=stale_seconds)
        self.worker = worker

    def begin(self, user_id: int, key: str, fp: str) -> Claim | Replay:
        """Claim ``key`` for this request, or say why not.

        Returns a :class:`Claim` (run the request) or a :class:`Replay` (answer
        with it). Raises :class:`KeyReused` or :class:`RequestInProgress`.
        """
        for _ in range(5):  # only a row released or expired under our feet loops again
            now = utcnow()
            token = uuid.uuid4().hex
            fresh = {"fingerprint": fp, "token": token, "worker": self.worker(), "response_status": None,
                     "response_body": None, "response_headers": None, "created_at": now,
                     "expires_at": now + self.ttl}
            with self.db.autocommit() as conn:
                stmt = _insert_if_absent(conn.dialect.name).values(user_id=user_id, key=key, **fresh)
                new_id = conn.execute(stmt.returning(_T.c.id)).scalar()
                if new_id is not None:
                    return Claim(new_id, token)
                row = conn.execute(select(_T).where(_T.c.user_id == user_id, _T.c.key == key)).first()
                if row is None:
                    continue  # released between our INSERT and SELECT: try to claim it again
                if row.response_status is not None and as_utc(row.expires_at) <= now:
                    # expired: a new request, as if the key had never been seen
                    if self._take(conn, row, fresh, _T.c.token == row.token):
                        return Claim(row.id, token)
                    continue
                if row.fingerprint != fp:
                    raise KeyReused(key)
                if row.response_status is not None:
                    return Replay(row.response_status, json.loads(row.response_body or "null"),
                                  dict(row.response_headers or {}), row.id, row.token)
                if self._abandoned(row, now):
                    log.warning("idempotency key taken over from a dead holder", extra={"holder": row.worker})
                    if self._take(conn, row, fresh, _T.c.token == row.token):
                        return Claim(row.id, token)
                    continue
                raise RequestInProgress(key)
        raise RequestInProgress(key)  # pragma: no cover - only if the row flip-flops five times

    def _abandoned(self, row: Any, now) -> bool:
        return as_utc(row.created_at) < now - self.stale or (
            bool(row.worker) and process.dead_here(row.worker) is True)

    @staticmethod
    def _take(conn, row: Any, fresh: dict[str, Any], condition) -> bool:
        """Replace the row's claim with ours if ``condition`` still holds (one conditional UPDATE)."""
        return conn.execute(update(_T).where(_T.c.id == row.id, condition).values(**fresh)).rowcount == 1

    def finish(self, claim: Claim, status: int, body: Any, headers: dict[str, str]) -> None:
        """Store the response to replay for the next IDEMPOTENCY_TTL_SECONDS; a no-op
        if the claim was lost meanwhile."""
        with self.db.autocommit() as conn:
            n = conn.execute(
                update(_T).where(_T.c.id == claim.id, _T.c.token == claim.token)
                .values(response_status=status, response_body=json.dumps(body), response_headers=headers,
                        expires_at=utcnow() + self.ttl)
            ).rowcount
        if n != 1:
            log.warning("idempotency claim lost before its response was stored", extra={"key_id": claim.id})

    def release(self, claim: Claim) -> None:
        """Forget the key (the request failed; nothing to replay): a retry runs again."""
        with self.db.autocommit() as conn:
            conn.execute(delete(_T).where(_T.c.id == claim.id, _T.c.token == claim.token))

    def forget(self, replay: Replay) -> None:
        """Drop a stored response that turned out not to be one (a stream whose call
        failed, refunded): the next request with the key runs."""
        with self.db.autocommit() as conn:
            conn.execute(delete(_T).where(_T.c.id == replay.id, _T.c.token == replay.token))

    def purge_expired(self) -> int:
        """Delete expired keys (housekeeping; an expired key is reclaimed anyway), and
        claims abandoned for longer than both the TTL and ``stale_seconds``."""
        now = utcnow()
        finished_or_abandoned = or_(_T.c.response_status.is_not(None), _T.c.created_at < now - self.stale)
        with self.db.autocommit() as conn:
            return conn.execute(delete(_T).where(and_(_T.c.expires_at <= now, finished_or_abandoned))).rowcount


__all__ = ["Claim", "Idempotency", "KeyReused", "Replay", "RequestInProgress", "fingerprint"]
