"""Job-end webhooks: a durable outbox, signed deliveries, retries with backoff.

* ``/async_call_model`` with a ``callback_url`` writes a ``waiting`` outbox row
  in the transaction that writes the job (``ledger.open_call``);
* the transaction that writes the job's final state (``ledger.record_completion``
  / ``record_failure``) arms it (:func:`arm`: ``pending``), so a job that ended
  always has its delivery due, whatever crashes next;
* a delivery loop (:meth:`Webhooks.start`; in Celery workers and in web
  processes that run jobs themselves) claims due rows with a lease, POSTs the
  job's ``/async_call_status`` JSON, and records the outcome: ``delivered`` on a
  2xx, else another attempt after the next WEBHOOK_BACKOFF_SECONDS wait, until
  WEBHOOK_MAX_ATTEMPTS (``failed``). A process killed mid-attempt leaves its
  lease to expire and the attempt is made again: delivery is at least once;
  receivers de-duplicate on ``webhook-id``.

Signatures follow Standard Webhooks (https://www.standardwebhooks.com):
``webhook-id``, ``webhook-timestamp`` and ``webhook-signature: v1,<base64 of
HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>``, the secret being the user's
``whsec_...`` (base64 after the prefix), shown by ``model-api users webhook-secret``.

SSRF: a ``callback_url`` must be ``https`` in production, and every address
its host resolves to must be public unless WEBHOOK_ALLOW_PRIVATE; checked at
submit and again at each delivery, which then connects to the very address it
checked (no second DNS answer can slip a private one in).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from ..db import Database, utcnow
from ..models import Call, WebhookDelivery, WebhookSecret, WebhookState
from .history import job_view

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
USER_AGENT = "model-api-webhooks/1"
_W = WebhookDelivery


class CallbackRefused(ValueError):
    """A ``callback_url`` this service will not call (400 at submit)."""


# --- signing -----------------------------------------------------------------------


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value (Standard Webhooks, scheme ``v1``)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance: int = 300) -> bool:
    """What a receiver does (and our tests do): recompute, compare in constant time,
    refuse timestamps more than ``tolerance`` seconds away."""
    h = {k.lower(): v for k, v in headers.items()}
    try:
        ts = int(h["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - ts) > tolerance:
        return False
    expected = sign(secret, h.get("webhook-id", ""), ts, body)
    return any(hmac.compare_digest(expected, s) for s in h.get("webhook-signature", "").split())


# --- the URL rules (SSRF) ----------------------------------------------------------


def _public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (a literal address resolves to itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))


def check_url(url: str, *, production: bool, allow_private: bool) -> list[str]:
    """Refuse (CallbackRefused) a URL we must not call; returns the addresses to
    connect to (empty when private ones are allowed: then any will do)."""
    if not isinstance(url, str) or len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(f"must be a URL of at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise CallbackRefused(f"not a valid URL: {exc}") from None
    allowed = ("https",) if production else ("https", "http")
    if parts.scheme not in allowed:
        raise CallbackRefused("must be an https URL" if production else "must be an http or https URL")
    if not parts.hostname:
        raise CallbackRefused("must name a host")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused("must not carry credentials")
    if allow_private:
        return []
    try:
        addresses = resolve(parts.hostname, port)
    except (OSError, UnicodeError):
        raise CallbackRefused(f"host {parts.hostname!r} does not resolve") from None
    blocked = [a for a in addresses if not _public(ipaddress.ip_address(a))]
    if not addresses or blocked:
        raise CallbackRefused(f"host {parts.hostname!r} resolves to a non-public address "
                              f"({', '.join(blocked) or 'none'}); loopback, private and link-local "
                              "addresses are refused")
    return addresses


# --- the outbox ----------------------------------------------------------------------


def arm(session: Session, call_id: uuid.UUID) -> None:
    """In the transaction that writes a job's final state: its webhook (if it asked
    for one) becomes due. ``next_attempt_at`` is the job's end; the first
    WEBHOOK_BACKOFF_SECONDS wait counts from there."""
    session.execute(
        update(_W).where(_W.call_id == call_id, _W.state == WebhookState.WAITING.value)
        .values(state=WebhookState.PENDING.value, next_attempt_at=utcnow())
        .execution_options(synchronize_session=False)
    )


@dataclass(frozen=True)
class _Attempt:
    id: uuid.UUID
    call_id: uuid.UUID
    url: str
    number: int  # this attempt's number (1-based): the row's ``attempts`` once claimed


@dataclass(frozen=True)
class WebhookPolicy:
    max_attempts: int
    backoff: tuple[float, ...]
    timeout: float
    allow_private: bool
    production: bool
    poll_seconds: float = 1.0

    def wait_before(self, attempt: int) -> float:
        """Seconds between the previous event (job end, or failed attempt) and attempt ``attempt`` (1-based)."""
        return self.backoff[min(attempt - 1, len(self.backoff) - 1)]


class Webhooks:
    def __init__(self, db: Database, policy: WebhookPolicy, *, housekeeping: Iterable[Callable[[], object]] = (),
                 client: httpx.Client | None = None):
        self.db = db
        self.policy = policy
        self._housekeeping = list(housekeeping)
        self._client = client
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._loop_pid: int | None = None
        self._lock = threading.Lock()

    # -- submit side

    def check(self, url: str) -> None:
        """Raise CallbackRefused if ``url`` may not be a callback here."""
        check_url(url, production=self.policy.production, allow_private=self.policy.allow_private)

    def secret_of(self, user_id: int, *, rotate: bool = False) -> str:
        """The user's signing secret, made on first use (or anew with ``rotate``)."""
        with self.db.session() as s:
            row = s.get(WebhookSecret, user_id, with_for_update=rotate)
            if row is None:
                s.add(WebhookSecret(user_id=user_id, secret=new_secret()))
                try:
                    s.flush()
                except Exception:  # made concurrently by another process: read theirs
                    s.rollback()
                    return s.get(WebhookSecret, user_id).secret  # type: ignore[union-attr]
                return s.get(WebhookSecret, user_id).secret  # type: ignore[union-attr]
            if rotate:
                row.secret = new_secret()
            return row.secret

    def statuses_of(self, call_ids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, Any]]:
        """``{state, attempts, last_status}`` (and ``last_error``) of these jobs' webhooks, by job id;
        jobs without one are absent."""
        if not call_ids:
            return {}
        with self.db.session() as s:
            rows = s.scalars(select(_W).where(_W.call_id.in_(call_ids))).all()
        out: dict[uuid.UUID, dict[str, Any]] = {}
        for row in rows:
            view: dict[str, Any] = {"state": row.state, "attempts": row.attempts, "last_status": row.last_status}
            if row.last_error:
                view["last_error"] = row.last_error
            out[row.call_id] = view
        return out

    # -- delivery side

    def deliver_due(self, limit: int = 16) -> int:
        """Claim the due deliveries (a lease each) and attempt them; returns how many were attempted."""
        claimed = self._claim(limit)
        if not claimed:
            return 0
        if len(claimed) == 1:
            self._attempt(claimed[0])
        else:
            with ThreadPoolExecutor(max_workers=min(4, len(claimed)), thread_name_prefix="webhook") as ex:
                list(ex.map(self._attempt, claimed))
        return len(claimed)

    def _due(self, now):
        first = timedelta(seconds=self.policy.wait_before(1))
        return and_(
            _W.state == WebhookState.PENDING.value,
            or_(and_(_W.attempts == 0, _W.next_attempt_at <= now - first),
                and_(_W.attempts > 0, _W.next_attempt_at <= now)),
            or_(_W.locked_until.is_(None), _W.locked_until < now),
        )

    def _claim(self, limit: int) -> list[_Attempt]:
        now = utcnow()
        lease = timedelta(seconds=2 * self.policy.timeout + 10)
        with self.db.session() as s:
            ids = s.scalars(select(_W.id).where(self._due(now)).order_by(_W.next_attempt_at).limit(limit)).all()
        out = []
        for wid in ids:
            # conditional: of several processes polling, one takes each row
            with self.db.session() as s:
                row = s.execute(
                    update(_W).where(_W.id == wid, self._due(now))
                    .values(attempts=_W.attempts + 1, locked_until=now + lease)
                    .returning(_W.id, _W.call_id, _W.url, _W.attempts)
                    .execution_options(synchronize_session=False)
                ).first()
            if row is not None:
                out.append(_Attempt(*row))
        return out

    def _attempt(self, a: _Attempt) -> None:
        import httpx  # here, not at start-up: a web process boots faster and may never deliver one

        status: int | None = None
        error: str | None = None
        try:
            with self.db.session() as s:
                call = s.get(Call, a.call_id)
                user_id = call.user_id if call is not None else None
                body = job_view(call) if call is not None else None
            if call is None or body is None:
                self._record(a, None, "the job no longer exists", final=True)
                return
            secret = self.secret_of(user_id)  # type: ignore[arg-type]
            payload = json.dumps(body, separators=(",", ":")).encode()
            status = self._post(a, payload, secret)
            if 200 <= status < 300:
                self._record(a, status, None, delivered=True)
                return
            error = f"HTTP {status}"
        except CallbackRefused as exc:
            self._record(a, None, f"refused: {exc}", final=True)
            return
        except httpx.TimeoutException:
            error = f"timed out after {self.policy.timeout:g}s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        except Exception as exc:  # the database, most likely: the lease expires and it is tried again
            log.warning("webhook attempt crashed", exc_info=True, extra={"delivery_id": str(a.id)})
            error = f"internal error: {type(exc).__name__}"
        self._record(a, status, error)

    def _post(self, a: _Attempt, payload: bytes, secret: str) -> int:
        import httpx

        addresses = check_url(a.url, production=self.policy.production, allow_private=self.policy.allow_private)
        parts = urlsplit(a.url)
        url, headers, extensions = a.url, {}, {}
        if addresses:
            # connect to the address just checked; the name still goes in Host and TLS SNI
            ip = addresses[0]
            netloc = (f"[{ip}]" if ":" in ip else ip) + (f":{parts.port}" if parts.port else "")
            url = urlunsplit(parts._replace(netloc=netloc))
            headers["Host"] = parts.netloc
            extensions["sni_hostname"] = parts.hostname
        ts = int(time.time())
        headers.update({
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": str(a.id),
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(secret, str(a.id), ts, payload),
        })
        client = self._client or httpx.Client(timeout=self.policy.timeout, follow_redirects=False)
        try:
            resp = client.post(url, content=payload, headers=headers, extensions=extensions)
            return resp.status_code
        finally:
            if client is not self._client:
                client.close()

    def _record(self, a: _Attempt, status: int | None, error: str | None, *, delivered: bool = False,
                final: bool = False) -> None:
        now = utcnow()
        values: dict[str, Any] = {"last_status": status, "last_error": error, "locked_until": None}
        if delivered:
            values.update(state=WebhookState.DELIVERED.value, delivered_at=now)
        elif final or a.number >= self.policy.max_attempts:
            values.update(state=WebhookState.FAILED.value)
        else:
            values.update(next_attempt_at=now + timedelta(seconds=self.policy.wait_before(a.number + 1)))
        with self.db.session() as s:
            # only this attempt's holder writes its outcome (a lease that expired was taken over)
            s.execute(update(_W).where(_W.id == a.id, _W.attempts == a.number).values(**values)
                      .execution_options(synchronize_session=False))
        log.info("webhook attempt", extra={"delivery_id": str(a.id), "job_id": str(a.call_id),
                                           "attempt": a.number, "http_status": status, "error": error,
                                           "state": values.get("state", WebhookState.PENDING.value)})

    # -- the loop

    def start(self) -> None:
        """Run the delivery loop in a daemon thread of this process (once per process)."""
        with self._lock:
            if self._loop_pid == os.getpid():
                return
            self._loop_pid = os.getpid()
            self._stop.clear()
        threading.Thread(target=self._loop, name="webhook-delivery", daemon=True).start()

    def kick(self) -> None:
        """Look for due deliveries now rather than at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _loop(self) -> None:
        last_housekeeping = 0.0
        while not self._stop.is_set():
            try:
                busy = self.deliver_due()
                if time.monotonic() - last_housekeeping > 60:
                    last_housekeeping = time.monotonic()
                    for task in self._housekeeping:
                        task()
            except Exception:  # the database is down: try again at the next poll
                log.warning("webhook delivery pass failed", exc_info=True)
                busy = 0
            if not busy:
                self._wake.wait(self.policy.poll_seconds)
                self._wake.clear()


__all__ = ["CallbackRefused", "WebhookPolicy", "Webhooks", "arm", "check_url", "new_secret", "sign", "verify"]
